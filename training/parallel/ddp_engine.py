"""The `ddp` engine: the model in one process, or under DistributedDataParallel with torchrun/SLURM.

Precision comes from training.parallel.precision (autocast, and a GradScaler for fp16);
checkpoints are our single-file format (training.checkpoint).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from data_pipeline.errors import UserError
from training import checkpoint as ckpt
from training.parallel.precision import Precision
from training.parallel.process_group import Distributed


class DDPEngine:
    def __init__(self, model, optimizer, precision: Precision, env: Distributed, grad_clip, compile_model):
        self.module = model.to(env.device)
        self.optimizer = optimizer
        self.precision = precision
        self.env = env
        self.grad_clip = grad_clip
        wrapped = self.module
        self.ddp: DistributedDataParallel | None = None  # kept for no_sync under compile
        if env.enabled and any(p.requires_grad for p in model.parameters()):
            wrapped = self.ddp = DistributedDataParallel(
                wrapped,
                device_ids=[env.local_rank] if env.device.type == "cuda" else None,
                # Every trainable parameter gets a gradient each step (locked towers have
                # requires_grad=False, which DDP ignores), so the unused-parameter scan stays off.
                find_unused_parameters=False,
            )
        self.wrapped = torch.compile(wrapped) if compile_model else wrapped

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def accumulate(self, last: bool):
        # Accumulating micro-batches: only the last backward all-reduces gradients under DDP.
        if last or self.ddp is None:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        with self.precision.autocast():
            return self.wrapped(image, text)

    def backward(self, loss: torch.Tensor, n_micro: int, last: bool) -> None:
        self.precision.scaler.scale(loss / n_micro).backward()

    def finish_step(self, skip: bool) -> float:
        """Clip and apply the accumulated gradients, or drop them when `skip`."""
        if skip:
            self.zero_grad()
            return float("nan")
        scaler = self.precision.scaler
        scaler.unscale_(self.optimizer)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        scaler.step(self.optimizer)
        scaler.update()
        return float(norm)

    def save(self, run_dir: Path, step: int, extra: dict[str, Any], keep: int) -> Path | None:
        if not self.env.is_main:
            return None
        state = {
            "engine": "ddp",
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.precision.scaler.state_dict(),
            **extra,
        }
        return ckpt.save_checkpoint(run_dir, step, state, keep)

    def load(self, path: Path) -> dict[str, Any]:
        state = ckpt.load_checkpoint(path)
        if state.get("engine", "ddp") != "ddp":
            raise UserError(f"{path} was written by the {state['engine']} engine; resume with engine.name={state['engine']}")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            self.precision.scaler.load_state_dict(state["scaler"])
        return state
