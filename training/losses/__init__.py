"""Contrastive losses: CLIP's InfoNCE, SigLIP's sigmoid loss, soft-target InfoNCE, and their
tiled ring versions (same values and gradients, memory linear in the batch).

    config.py        LossConfig and build_loss: the `[loss]` section of a run
    contrastive.py   the naive losses over gathered features
    ring.py          passing feature tiles round a ring of ranks (shared by the tiled losses)
    tiled_clip.py    tiled InfoNCE
    tiled_siglip.py  tiled SigLIP
"""

from training.losses.config import LOSS_NAMES, LossConfig, build_loss
from training.losses.contrastive import ClipLoss, SigLipLoss, SoftTargetClipLoss

__all__ = ["LOSS_NAMES", "ClipLoss", "LossConfig", "SigLipLoss", "SoftTargetClipLoss", "build_loss"]
