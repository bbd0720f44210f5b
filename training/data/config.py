"""The `[data]` section of a run: which shards, how they are shuffled and batched, and the
augmentation (handed to the transforms as its own small `AugmentConfig`)."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

from data_pipeline.object_store import ReadRetry
from training.data.sources import SOURCE_SEPARATOR


AUGMENT_ON = ("workers", "device")


class DataError(Exception):
    """The data cannot be used as configured (shown by the CLI as one line)."""


@dataclass
class DataConfig:
    """Training data. Shards are webdataset tars as img2dataset writes them (KEY.jpg, KEY.txt,
    KEY.json), with an optional sizes.json ({"00000.tar": n, ...}) beside them.

    train_shards: one or more sources joined with `::`. A source is a brace pattern
        (`dir/{00000..00099}.tar`), a directory (all *.tar in it), an fsspec URL (`s3://...`,
        `file://...`, directory or pattern), or a `pipe:` command (`pipe:aws s3 cp s3://b/0.tar -`).
    train_data_weights: share of samples drawn from each source (normalized; mixing is per
        sample). None = proportional to source size: samples listed in sizes.json if every source
        has one, else the shard count. Either way a source is re-read when exhausted.
    num_samples: samples per "epoch" (logging and schedules only). None = sum of sizes.json.
    resampled: draw shards with replacement (no epochs) instead of epoch-wise permutations.
    shard_shuffle: permute shard order per epoch (ignored when resampled).
    sample_shuffle_buffer: raw samples held per worker for shuffling; 0 = off.
    workers: dataloader worker processes per rank; 0 = load in the main process.
    batch_size: per rank.
    scale, hflip, color_jitter, color_mix, random_erasing: augmentation, see
        training.data.transforms.
    augment_on: "workers" (decode and augment in the dataloader workers) or "device" (workers
        decode, draw and crop; resize, flip, jitter, erasing and normalisation run batched on
        the GPU: training.data.device_augment). Same random draws either way.
    keep_list: a keep_list.parquet from `python -m data_pipeline.curate`: only its kept pairs
        of train_shards are used (training.data.keep_list), without copying the shards.
    read_retries, read_backoff_s, read_timeout_s, read_block_size: remote shards (s3://, gs://,
        ...): a failed read is retried from the byte where it stopped, `read_retries` times in a
        row with waits doubling from `read_backoff_s`, then the rest of that shard is skipped and
        counted (data_pipeline.object_store.ReadRetry); a read stalled `read_timeout_s` fails;
        `read_block_size` bytes per ranged GET (None: the filesystem's default).
    """

    train_shards: str
    train_data_weights: list[float] | None = None
    num_samples: int | None = None
    resampled: bool = False
    shard_shuffle: bool = True
    sample_shuffle_buffer: int = 1000
    workers: int = 4
    image_size: int = 224
    batch_size: int = 256
    scale: tuple[float, float] = (0.9, 1.0)
    hflip: float = 0.0
    color_jitter: float = 0.0
    color_mix: float = 0.0
    random_erasing: float = 0.0
    augment_on: str = "workers"
    keep_list: str | None = None
    read_retries: int = 5
    read_backoff_s: float = 1.0
    read_timeout_s: float = 60.0
    read_block_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.train_shards, str) or not self.train_shards.strip():
            raise ValueError("train_shards must be a non-empty string")
        parts = self.train_shards.split(SOURCE_SEPARATOR)
        if any(not part.strip() for part in parts):
            raise ValueError(f"train_shards has an empty source: {self.train_shards!r}")
        if self.train_data_weights is not None:
            self.train_data_weights = [float(w) for w in self.train_data_weights]
            if len(self.train_data_weights) != len(parts):
                raise ValueError(
                    f"train_data_weights has {len(self.train_data_weights)} entries for "
                    f"{len(parts)} sources"
                )
            if not all(math.isfinite(w) and w > 0 for w in self.train_data_weights):
                raise ValueError(f"train_data_weights must be > 0: {self.train_data_weights}")
        if self.num_samples is not None and self.num_samples <= 0:
            raise ValueError(f"num_samples must be > 0, got {self.num_samples}")
        for name in ("sample_shuffle_buffer", "workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("image_size", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        self.scale = tuple(float(s) for s in self.scale)
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high <= 1: {self.scale}")
        for name in ("hflip", "random_erasing"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a probability, got {getattr(self, name)}")
        for name in ("color_jitter", "color_mix"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_list is not None and not os.path.isfile(self.keep_list):
            raise ValueError(f"keep_list {self.keep_list}: no such file (write one with "
                             "python -m data_pipeline.curate)")
        self.read_retry()  # validates the read_* fields
        if self.augment_on not in AUGMENT_ON:
            raise ValueError(f"augment_on must be one of {', '.join(AUGMENT_ON)}, "
                             f"got {self.augment_on!r}")

    def fingerprint(self) -> dict[str, Any]:
        """The fields that shape the batch sequence; a resume must not change any of them."""
        fields = dataclasses.asdict(self)
        fields.pop("num_samples")
        # Where the augmentation runs changes no draw and no sample order, only the resize
        # filter: a run may move between the two (e.g. onto a GPU machine) and resume exactly.
        fields.pop("augment_on")
        if not self.color_mix:  # added later: checkpoints from before it still resume
            fields.pop("color_mix")
        # How patiently storage is read decides no sample order (a retried read delivers the
        # same bytes), and a resumed run may well need more patience than the first.
        for name in ("read_retries", "read_backoff_s", "read_timeout_s", "read_block_size"):
            fields.pop(name)
        fields["scale"] = list(self.scale)
        return fields

    def read_retry(self) -> ReadRetry:
        return ReadRetry(retries=self.read_retries, backoff_s=self.read_backoff_s,
                         max_backoff_s=max(30.0, self.read_backoff_s),
                         timeout_s=self.read_timeout_s, block_size=self.read_block_size)

    def augment(self) -> AugmentConfig:
        return AugmentConfig(self.image_size, self.scale, self.hflip, self.color_jitter,
                             self.random_erasing, self.augment_on, self.color_mix)


@dataclass(frozen=True)
class AugmentConfig:
    """What the train transform needs (validated by DataConfig, which holds the same fields)."""

    image_size: int
    scale: tuple[float, float] = (0.9, 1.0)
    hflip: float = 0.0
    color_jitter: float = 0.0
    random_erasing: float = 0.0
    on: str = "workers"  # or "device": see DataConfig.augment_on
    color_mix: float = 0.0
