"""Which contrastive loss a run uses (`[loss]` in the run TOML), and building it."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from training.losses.contrastive import ClipLoss, SigLipLoss, SoftTargetClipLoss
from training.losses.ring import DEFAULT_TILE_SIZE
from training.losses.tiled_clip import TiledClipLoss
from training.losses.tiled_siglip import TiledSigLipLoss

LOSS_NAMES = ("clip", "siglip", "soft_clip")


@dataclass
class LossConfig:
    """`name`: "clip" (InfoNCE, Radford et al. 2021), "siglip" (sigmoid, Zhai et al. 2023; the
    model needs a logit bias, see model.configs.for_siglip) or "soft_clip" (InfoNCE with soft
    targets). `soft_target_scale`: soft_clip only; temperature of the targets, None = the
    model's current logit scale. `tiled`: compute clip/siglip tile by tile round a ring of
    ranks (tiled_clip.py): same values and gradients, memory linear in the batch instead of
    quadratic; `tile_size`: rows/columns per tile there."""

    name: str = "clip"
    soft_target_scale: float | None = None
    tiled: bool = False
    tile_size: int = DEFAULT_TILE_SIZE

    def __post_init__(self) -> None:
        if self.name not in LOSS_NAMES:
            raise ValueError(f"unknown loss {self.name!r}; choose from {LOSS_NAMES}")
        if self.soft_target_scale is not None:
            if self.name != "soft_clip":
                raise ValueError("soft_target_scale only applies to the soft_clip loss")
            if self.soft_target_scale <= 0:
                raise ValueError(
                    f"soft_target_scale must be positive, got {self.soft_target_scale}"
                )
        if self.tiled and self.name == "soft_clip":
            raise ValueError("loss.tiled is implemented for clip and siglip, not soft_clip")
        if self.tile_size < 1:
            raise ValueError(f"loss.tile_size must be >= 1, got {self.tile_size}")


def build_loss(cfg: LossConfig) -> nn.Module:
    if cfg.tiled:
        tiled = TiledClipLoss if cfg.name == "clip" else TiledSigLipLoss
        return tiled(tile_size=cfg.tile_size)
    if cfg.name == "clip":
        return ClipLoss()
    if cfg.name == "siglip":
        return SigLipLoss()
    return SoftTargetClipLoss(target_scale=cfg.soft_target_scale)
