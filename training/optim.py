"""AdamW with CLIP's weight-decay exclusions, and the cosine-with-warmup learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2
    # CLIP (Radford et al. 2021) used beta2 = 0.98 and eps = 1e-6 for stability at large batch.
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # torch's fused AdamW kernel (CPU and CUDA): one pass over each parameter instead of the
    # foreach path's dozen elementwise passes; for ViT-S/32 on 2 CPU cores its step took ~0.07 s
    # against 0.2-0.6 s (bench/profiles/SUMMARY.md). Off only to compare with the reference path.
    fused: bool = True

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("optim.beta1 and optim.beta2 must lie in [0, 1)")
        if self.warmup_steps < 0:
            raise ValueError("optim.warmup_steps must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("optim.min_lr_ratio must lie in [0, 1]")
        if self.grad_clip < 0:
            raise ValueError("optim.grad_clip must be >= 0 (0 disables clipping)")


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    # The model knows which of its parameters are biases, norms and embeddings (decaying those
    # pulls them to zero for no regularisation benefit); locked towers get no optimizer state.
    from training.model import param_groups_for_weight_decay

    groups = [g for g in param_groups_for_weight_decay(model, cfg.weight_decay) if g["params"]]
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=cfg.fused or None
    )


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at total_steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    # The schedule is a pure function of the step, so resuming needs no scheduler state beyond it.
    for group in optimizer.param_groups:
        group["lr"] = lr
