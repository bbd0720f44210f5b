"""The one place that knows about numeric precision: an autocast context and a gradient-scaler
policy. The training loop calls `precision.autocast()` and `precision.scaler` and never branches on
dtype itself."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

PrecisionName = Literal["bf16", "fp16", "fp32"]


@dataclass
class Precision:
    name: PrecisionName
    device_type: str  # "cpu" or "cuda"

    def __post_init__(self) -> None:
        if self.name not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be bf16, fp16 or fp32, got {self.name!r}")
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[self.name]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)
