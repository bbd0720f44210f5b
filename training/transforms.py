"""Image transforms for CLIP training and evaluation.

Train: RandomResizedCrop (bicubic) -> optional horizontal flip -> optional brightness/contrast
jitter -> ToTensor -> Normalize (CLIP statistics) -> optional RandomErasing.
Eval: Resize shorter side (bicubic) -> CenterCrop -> ToTensor -> Normalize.

All random choices come from torch's global generator (torchvision's v1 transforms draw from it),
which is what lets `training.data` make augmentation reproducible by seeding that generator per
sample inside `torch.random.fork_rng`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torchvision import transforms as T

if TYPE_CHECKING:  # data.py imports this module; the config is only needed for type checking
    from training.data import DataConfig

# The statistics of OpenAI's CLIP training set; every public CLIP checkpoint expects them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_train_transform(cfg: DataConfig) -> T.Compose:
    """PIL RGB image -> normalized float tensor [3, cfg.image_size, cfg.image_size]."""
    steps: list = [
        T.RandomResizedCrop(
            cfg.image_size, scale=tuple(cfg.scale), interpolation=T.InterpolationMode.BICUBIC
        )
    ]
    if cfg.hflip > 0:
        # Flips are not free for CLIP: captions saying "left"/"right" become wrong. Off by default.
        steps.append(T.RandomHorizontalFlip(p=cfg.hflip))
    if cfg.color_jitter > 0:
        # Brightness and contrast only: hue/saturation shifts contradict color words in captions.
        steps.append(T.ColorJitter(brightness=cfg.color_jitter, contrast=cfg.color_jitter))
    steps += [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    if cfg.random_erasing > 0:
        # After Normalize, value 0 paints the erased box with the dataset mean color.
        steps.append(T.RandomErasing(p=cfg.random_erasing, value=0))
    return T.Compose(steps)


def build_eval_transform(image_size: int) -> T.Compose:
    """Deterministic: resize the shorter side, then take the center square."""
    return T.Compose(
        [
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
