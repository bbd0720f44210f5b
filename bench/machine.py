"""What the bench ran on: CPU model, usable cores, memory, load, torch version, GPU if any.

Every results file carries this, because every figure in it is only meaningful next to the
machine (and the load from other jobs) it was measured on.
"""

from __future__ import annotations

import os
import platform

import torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemTotal"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def describe(device: str = "cpu") -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    machine = {
        "cpu": _cpu_model(),
        "usable_cores": cores,
        "memory_gib": _memory_gib(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": device,
        "load_average_1min": load_average(),
    }
    if device == "cuda" and torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name(0)
    return machine


def one_line(machine: dict) -> str:
    text = (
        f"{machine['cpu']}, {machine['usable_cores']} usable cores, {machine['memory_gib']} GiB RAM, "
        f"torch {machine['torch']} ({machine['torch_threads']} threads), Python {machine['python']}"
    )
    if machine.get("gpu"):
        text += f", GPU {machine['gpu']}"
    return text
