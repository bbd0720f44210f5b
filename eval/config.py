"""Typed configs of the eval jobs: how to run inference, where the datasets are, the linear probe.

Each is validated when built, so a bad value fails before any checkpoint is loaded. Paths are
only checked for being set here; whether the folder has the expected layout is checked by the
dataset readers (eval.datasets), which know what to say about it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch

from data_pipeline.errors import UserError
from training.parallel.precision import choose_precision

PrecisionName = Literal["auto", "fp32", "bf16"]


def add_precision_flag(parser) -> None:
    """`--precision` as every eval entry point spells it (an argparse parser or group)."""
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto: bf16 where the hardware has it natively, else fp32")


@dataclass
class InferenceConfig:
    """batch_size: images (or texts) per forward pass. workers: dataloader processes decoding
    images. precision: auto (default: bf16 autocast where the hardware has native bf16, as the
    trainer chooses; fp32 elsewhere), fp32 (exact and comparable across machines) or bf16.
    max_images: cap on images per dataset (None = all), for quick looks; results then say so."""

    batch_size: int = 256
    workers: int = 2
    precision: PrecisionName = "auto"
    device: str = "auto"
    max_images: int | None = None
    # Under torchrun (eval.run sets it): each rank encodes a slice, features gathered (eval.sharding).
    sharded: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise UserError(f"--workers must be >= 0, got {self.workers}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise UserError(f"--precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.max_images is not None and self.max_images < 1:
            raise UserError(f"--max-images must be >= 1, got {self.max_images}")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        device_type = "cuda" if str(self.device).startswith("cuda") else "cpu"
        choice = choose_precision(self.precision, device_type)
        if choice.warning:
            print(choice.warning, file=sys.stderr, flush=True)
        self.precision = choice.name  # resolved: results record what actually ran


@dataclass
class DataPaths:
    """Where each dataset lives; None = not available (a suite that needs it refuses to start).

    demo: a demo corpus root (train/ val/ heldout/ corpus.json), as data_pipeline.shards writes.
    cifar10 / cifar100: `cifar-10-batches-py` / `cifar-100-python` folders, or their parent.
    imagenet: ImageNet val as synset folders (n01440764/...), or a folder of webdataset shards
        with .cls labels.
    imagefolder: any ImageFolder (one sub-folder per class); imagefolder_classes: a text file
        with one class name per line, in sorted folder order (default: the folder names).
    retrieval_csv: CSV with columns image, caption (several rows per image; paths relative to
        the CSV). retrieval_shards: webdataset shards whose .txt holds one caption per line.
    wds_root: local copies of DataComp's / CLIP_benchmark's eval sets, one folder per task
        (wds_imagenet1k/, wds_vtab-cifar100_test/, ...; eval.wds_tasks), for the datacomp,
        imagenet_shifts and vtab suites and the retrieval suite's Flickr/MSCOCO.
    """

    demo: Path | None = None
    cifar10: Path | None = None
    cifar100: Path | None = None
    imagenet: str | None = None  # a folder, or a shard spec (pattern, URL)
    imagefolder: Path | None = None
    imagefolder_classes: Path | None = None
    retrieval_csv: Path | None = None
    retrieval_shards: str | None = None  # a shard spec, as training's train_shards
    wds_root: Path | None = None  # one folder per task in CLIP_benchmark's webdataset layout
    sugarcrepe: Path | None = None  # the sugar-crepe data/ JSONs (eval.compositionality)
    sugarcrepe_images: Path | None = None  # COCO val2017 (default: val2017/ beside the JSONs)
    winoground: Path | None = None  # data/examples.jsonl + data/images/

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and f.name not in ("imagenet", "retrieval_shards"):
                setattr(self, f.name, Path(value).expanduser())
        if self.imagenet is not None:
            self.imagenet = os.path.expanduser(str(self.imagenet))
        if self.imagefolder_classes is not None and self.imagefolder is None:
            raise UserError("--imagefolder-classes needs --imagefolder")


@dataclass
class LinearProbeConfig:
    """Logistic regression on frozen, L2-normalised image features.

    C (inverse regularisation strength) is chosen among `c_grid` by accuracy on `val_fraction`
    of the training images, then the classifier is refit on all of them and scored on the test
    split. datasets: which datasets to probe (None = every one whose path is given and that has
    a training split: demo, cifar10, cifar100, imagefolder with train/ and val/ or test/).
    max_train_images: cap on training images (a random subset; None = all).
    blas_threads: threads for the solver's matrix products (None = the BLAS default). On a
        shared or oversubscribed machine 1 can be an order of magnitude faster: OpenBLAS
        threads spin while they wait for cores.
    """

    datasets: list[str] | None = None
    # Normalised features have small norms, so useful C values are large: the grid reaches 1e6.
    c_grid: list[float] = field(default_factory=lambda: [10.0**k for k in range(-1, 7)])
    val_fraction: float = 0.2
    max_iter: int = 1000
    max_train_images: int | None = None
    seed: int = 0
    blas_threads: int | None = None

    def __post_init__(self) -> None:
        if self.blas_threads is not None and self.blas_threads < 1:
            raise UserError(f"--probe-threads must be >= 1, got {self.blas_threads}")
        if not self.c_grid or any(c <= 0 for c in self.c_grid):
            raise UserError(f"linear probe C grid must be positive values, got {self.c_grid}")
        if not 0 < self.val_fraction < 1:
            raise UserError(f"linear probe val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.max_iter < 1:
            raise UserError(f"linear probe max_iter must be >= 1, got {self.max_iter}")
        if self.max_train_images is not None and self.max_train_images < 2:
            raise UserError(f"--probe-max-train must be >= 2, got {self.max_train_images}")
        if self.datasets is not None:
            unknown = sorted(set(self.datasets) - set(PROBE_DATASETS))
            if unknown:
                raise UserError(
                    f"linear probe datasets {unknown} unknown; choose from {', '.join(PROBE_DATASETS)}"
                )


# Datasets the linear probe knows how to split into train and test.
PROBE_DATASETS: tuple[str, ...] = ("demo", "cifar10", "cifar100", "imagefolder")
