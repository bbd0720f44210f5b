"""Raw sample -> (image tensor, token ids), batching with dynamic padding, and shard judging.

Runs inside dataloader workers, after the resume skip point (see `training.data.loader`). What
makes a sample unusable is decided by `data_pipeline.shard_format`, the same judge `validate` uses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from data_pipeline.shard_format import BadSample, RawSample, decode_caption, decode_pixels
from training.data.device_augment import DrawnCrop, collate_crops
from training.data.transforms import stack_images
from training.text.tokenizer import pad_batch


@dataclass
class StageTimes:
    """Seconds a worker spent per stage (loader telemetry: which stage makes a run data-bound)."""

    read: float = 0.0  # tar members and the shuffle buffer, up to the raw sample
    decode: float = 0.0  # JPEG -> pixels
    augment: float = 0.0  # crop, resize, flip, ...
    tokenize: float = 0.0

    def as_list(self) -> list[float]:
        return [self.read, self.decode, self.augment, self.tokenize]


def decode_sample(
    raw: RawSample,
    transform: Callable[[np.ndarray], torch.Tensor],
    tokenize: Callable[[str], Sequence[int]],
    augment_seed: int | None = None,
    min_image_size: int | None = None,
    times: StageTimes | None = None,
) -> tuple[torch.Tensor | DrawnCrop, Sequence[int]]:
    """Raises BadSample for anything wrong with the data. Tokenizer errors propagate: they are
    bugs, not bad data.

    augment_seed: if given, the transform's random draws come from torch's generator seeded with
    it, inside fork_rng so the caller's RNG state (the trainer's, when workers=0) is untouched.
    min_image_size: smallest image side the transform needs (see `decode_pixels`).
    times: if given, the seconds spent decoding, augmenting and tokenizing are added to it.
    """
    if "__error__" in raw:
        raise BadSample(raw["__error__"])
    caption = decode_caption(raw)  # cheaper than the image: check it first
    started = time.perf_counter()
    image = decode_pixels(raw, min_image_size)
    decoded = time.perf_counter()
    if augment_seed is None:
        pixels = transform(image)
    else:
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only (what fork_rng saves and torchvision draws from):
            # torch.manual_seed also queues a seed for every lazily initialised accelerator,
            # recording a stack trace each time, which cost more than the JPEG decode
            # (bench/data_loader.py). Same draws as torch.manual_seed on the CPU.
            torch.default_generator.manual_seed(augment_seed)
            pixels = transform(image)
    augmented = time.perf_counter()
    tokens = tokenize(caption)
    if times is not None:
        times.decode += decoded - started
        times.augment += augmented - decoded
        times.tokenize += time.perf_counter() - augmented
    if len(tokens) == 0:
        raise BadSample("caption tokenized to nothing")
    return pixels, tokens


def collate(
    images: list[torch.Tensor] | list[DrawnCrop], token_lists: list[Sequence[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Stack images; pad texts to the longest caption *of this batch* (dynamic text length:
    short captions cost no attention over padding). Crops for the device's augmentation
    (`data.augment_on=device`) travel as padded uint8 crops plus their drawn parameters."""
    text = pad_batch(token_lists, pad_id)
    if images and isinstance(images[0], DrawnCrop):
        crops, params = collate_crops(images)
        return {"image": crops, "augment_params": params, "text": text}
    return {"image": stack_images(images), "text": text}


class ShardJudge:
    """Notices a shard reading in which not a single sample was usable.

    Such a shard means a wrong dataset (e.g. .cls labels but no .txt captions), not bad luck:
    skipping it forever would turn into a silent hang (OpenCLIP's failure mode), so `record`
    returns an error message once the whole reading has gone through decoding. Readings of
    which some samples were skipped unseen on resume are never judged.
    """

    def __init__(self) -> None:
        # visit id -> [items seen, usable items, total items or None, unjudgeable, first reason]
        self._visits: dict[int, list[Any]] = {}

    def record(self, raw: RawSample, usable: bool | None, reason: str = "") -> str | None:
        """usable=None: skipped without decoding (resume). Returns an error message or None."""
        state = self._visits.setdefault(raw["__visit__"], [0, 0, None, False, ""])
        state[0] += 1
        if usable:
            state[1] += 1
        elif usable is None:
            state[3] = True
        elif not state[4]:
            state[4] = reason
        if "__visit_total__" in raw:
            state[2] = raw["__visit_total__"]
        if state[2] is None or state[0] < state[2]:
            return None
        seen, usable_count, _, unjudgeable, first_reason = self._visits.pop(raw["__visit__"])
        if usable_count or unjudgeable:
            return None
        return (
            f"shard {raw['__url__']} yielded no usable sample ({seen} read, all skipped; "
            f"first reason: {first_reason})"
        )
