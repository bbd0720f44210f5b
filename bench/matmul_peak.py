"""The practical compute limit: GFLOP/s of a large square matmul, fp32 and bf16, on one device.

    .venv/bin/python -m bench.matmul_peak [--device cuda] [--size 2048]

MFU (bench.train_throughput) is quoted against the bf16 figure measured in the same run, since
what the cores can do changes with the load other jobs put on them. On a GPU the vendor's dense
bf16 peak is quoted beside it (H100 SXM: 989 TFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, FLOP/s.
VENDOR_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels are asynchronous: time only finished work


def matmul_flops_per_s(
    dtype: torch.dtype, size: int = 2048, device: str = "cpu", min_seconds: float = 1.0
) -> float:
    """Best-of-repeats FLOP/s of `size`^3 matmuls (2 * size^3 FLOPs each)."""
    dev = torch.device(device)
    a = torch.randn(size, size, device=dev).to(dtype)
    b = torch.randn(size, size, device=dev).to(dtype)
    a @ b  # warm-up: kernel selection, page faults, oneDNN/cuBLAS initialisation
    _sync(dev)
    best, spent = float("inf"), 0.0
    while spent < min_seconds:
        started = time.perf_counter()
        a @ b
        _sync(dev)
        elapsed = time.perf_counter() - started
        best, spent = min(best, elapsed), spent + elapsed
    return 2 * size**3 / best


def vendor_peak(device: str = "cpu") -> float | None:
    if device != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((peak for key, peak in VENDOR_BF16_PEAK.items() if key in name), None)


def measure(device: str = "cpu", size: int = 2048, min_seconds: float = 1.0) -> dict:
    return {
        "size": size,
        "fp32_gflops": matmul_flops_per_s(torch.float32, size, device, min_seconds) / 1e9,
        "bf16_gflops": matmul_flops_per_s(torch.bfloat16, size, device, min_seconds) / 1e9,
        "vendor_bf16_gflops": (vendor_peak(device) or 0) / 1e9 or None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.device, args.size), indent=1))


if __name__ == "__main__":
    main()
