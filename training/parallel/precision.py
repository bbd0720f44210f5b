"""The one place that knows about numeric precision: which precision a run uses on this hardware,
an autocast context and a gradient-scaler policy. The training loop calls `precision.autocast()`
and `precision.scaler` and never branches on dtype itself.

`auto` (the default everywhere) picks from the machine, never from habit:
  * CUDA: bf16 autocast where the GPU supports it (Ampere and later), else fp16 with a scaler;
  * CPU: bf16 only where the CPU has it natively (AVX512-BF16 or AMX on x86, the BF16 extension on
    Arm), fp32 otherwise. Elsewhere torch emulates bf16: on an AMD EPYC Zen 3 (AVX2 only) a bf16
    1024^2 matmul ran at 0.7 GFLOP/s against 63 GFLOP/s in fp32, and the demo's training took
    ~18 minutes instead of 76 s.
An explicit bf16 on an emulating CPU still runs, after one warning line.
"""

from __future__ import annotations

import contextlib
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

PrecisionName = Literal["auto", "bf16", "fp16", "fp32"]
RESOLVED = ("bf16", "fp16", "fp32")
# /proc/cpuinfo flags that mean bf16 arithmetic in hardware: x86 AVX512-BF16 and AMX tiles, Arm's
# FEAT_BF16 (listed as "bf16" under Features).
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
# Measured here (see the module docstring): fp32 over emulated-bf16 matmul throughput.
EMULATED_BF16_SLOWDOWN = "~100x"


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU feature flags of this machine (Linux /proc/cpuinfo; empty elsewhere)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.is_file() else ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return frozenset(flags)


def cpu_model_name(cpuinfo: str | None = None) -> str:
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.is_file() else ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() == "model name" and value.strip():
            return value.strip()
    return platform.machine() or "this CPU"


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    if flags is None:
        flags = cpu_flags()
    return bool(flags & NATIVE_BF16_CPU_FLAGS)


@dataclass(frozen=True)
class PrecisionChoice:
    """What a run computes in, and why: printed in the run header and saved in checkpoints."""

    requested: str
    name: Literal["bf16", "fp16", "fp32"]
    reason: str
    warning: str | None = None  # set when the choice will run far slower than it could


def choose_precision(
    requested: str, device_type: str, *, cuda_bf16: bool | None = None,
    cpu_native_bf16: bool | None = None,
) -> PrecisionChoice:
    """Resolve `requested` ("auto", "bf16", "fp16", "fp32") for a device of `device_type`.
    `cuda_bf16` / `cpu_native_bf16` override the hardware probes (tests simulate machines)."""
    if requested not in ("auto", *RESOLVED):
        raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got {requested!r}")
    if device_type == "cuda":
        if cuda_bf16 is None:
            cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if requested != "auto":
            return PrecisionChoice(requested, requested, "as configured")
        if cuda_bf16:
            return PrecisionChoice(requested, "bf16", "auto: this GPU supports bf16")
        return PrecisionChoice(requested, "fp16", "auto: this GPU has no bf16; fp16 with a scaler")
    if cpu_native_bf16 is None:
        cpu_native_bf16 = cpu_has_native_bf16()
    cpu = cpu_model_name()
    if requested == "auto":
        if cpu_native_bf16:
            return PrecisionChoice(requested, "bf16", f"auto: {cpu} has native bf16 (AVX512-BF16/AMX)")
        return PrecisionChoice(requested, "fp32", f"auto: {cpu} has no native bf16, so fp32")
    warning = None
    if requested == "bf16" and not cpu_native_bf16:
        warning = (
            f"warning: precision bf16 on {cpu}, which has no native bf16 (no AVX512-BF16/AMX): "
            f"torch emulates it, expect steps {EMULATED_BF16_SLOWDOWN} slower than fp32; "
            f"use precision auto or fp32"
        )
    return PrecisionChoice(requested, requested, "as configured", warning)


@dataclass
class Precision:
    name: Literal["bf16", "fp16", "fp32"]
    device_type: str  # "cpu" or "cuda"

    def __post_init__(self) -> None:
        if self.name not in RESOLVED:
            raise ValueError(f"precision must be bf16, fp16 or fp32 here (resolve auto with "
                             f"choose_precision first), got {self.name!r}")
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[self.name]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)
