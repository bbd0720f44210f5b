"""The options of one img2dataset run, as a typed config checked before any work starts."""

from __future__ import annotations

import os
from dataclasses import dataclass

from data_pipeline.errors import UserError

INPUT_FORMATS = (
    "txt",
    "txt.gz",
    "csv",
    "csv.gz",
    "tsv",
    "tsv.gz",
    "json",
    "json.gz",
    "jsonl",
    "jsonl.gz",
    "parquet",
)
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
# img2dataset also has "ray"; we list what we document and have run.
DISTRIBUTORS = ("multiprocessing", "pyspark")
# Columns img2dataset writes itself; asking it to also copy one of these from the URL list fails.
RESERVED_COLUMNS = frozenset(
    {
        "key",
        "caption",
        "url",
        "width",
        "height",
        "original_width",
        "original_height",
        "status",
        "error_message",
        "exif",
        "md5",
        "sha256",
        "sha512",
    }
)


def infer_input_format(path: str) -> str | None:
    """The img2dataset input format that a file name's extension implies, if any."""
    name = path.rstrip("/").lower()
    for fmt in sorted(INPUT_FORMATS, key=len, reverse=True):  # "csv.gz" before "gz"-less names
        if name.endswith("." + fmt):
            return fmt
    return None


@dataclass(frozen=True)
class ShardConfig:
    """Everything that decides what lands in the shard folder `output`.

    `url_list`, `input_format`, `samples_per_shard` decide which URL lands in which shard, so an
    `incremental` rerun must keep them; the rest changes how, not what.
    """

    output: str
    url_list: str | None = None
    input_format: str = "parquet"
    url_col: str = "url"
    caption_col: str = "caption"
    extra_columns: tuple[str, ...] = ()
    image_size: int = 256
    resize_mode: str = "border"
    encode_quality: int = 95
    min_image_size: int = 0
    processes: int = max(1, os.cpu_count() or 1)
    threads: int = 64
    samples_per_shard: int = 10_000
    retries: int = 0
    timeout: float = 10.0
    incremental: bool = False
    distributor: str = "multiprocessing"
    wandb: bool = False
    wandb_project: str = "clipstream-shards"

    def __post_init__(self) -> None:
        if not self.output:
            raise UserError("--output must name a folder (local path or fsspec URL)")
        if self.input_format not in INPUT_FORMATS:
            raise UserError(
                f"--input-format must be one of {', '.join(INPUT_FORMATS)}, got {self.input_format!r}"
            )
        if self.input_format.startswith("txt"):
            raise UserError(
                "a txt URL list has no captions, and CLIP needs one per image: "
                "use csv/tsv/json/jsonl/parquet with a caption column"
            )
        if not self.url_col or not self.caption_col or self.url_col == self.caption_col:
            raise UserError(
                "--url-col and --caption-col must be two different column names, "
                f"got {self.url_col!r} and {self.caption_col!r}"
            )
        reserved = sorted(RESERVED_COLUMNS.intersection(self.extra_columns))
        if reserved:
            raise UserError(
                f"--extra-columns cannot include {', '.join(reserved)}: img2dataset writes those itself"
            )
        if self.url_col in self.extra_columns or self.caption_col in self.extra_columns:
            raise UserError("--extra-columns must not repeat the url or caption column")
        if self.resize_mode not in RESIZE_MODES:
            raise UserError(
                f"--resize-mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}"
            )
        if self.distributor not in DISTRIBUTORS:
            raise UserError(
                f"--distributor must be one of {', '.join(DISTRIBUTORS)}, got {self.distributor!r}"
            )
        positive = {
            "--image-size": self.image_size,
            "--processes": self.processes,
            "--threads": self.threads,
            "--samples-per-shard": self.samples_per_shard,
            "--timeout": self.timeout,
        }
        for flag, value in positive.items():
            if value <= 0:
                raise UserError(f"{flag} must be positive, got {value}")
        if self.retries < 0 or self.min_image_size < 0:
            raise UserError("--retries and --min-image-size cannot be negative")
        if not 0 <= self.encode_quality <= 100:
            raise UserError(f"--encode-quality is a JPEG quality within 0..100, got {self.encode_quality}")

    def layout_options(self) -> dict[str, object]:
        """The options that must match between a folder's first run and an incremental rerun."""
        return {
            "url_list": self.url_list,
            "input_format": self.input_format,
            "url_col": self.url_col,
            "caption_col": self.caption_col,
            "samples_per_shard": self.samples_per_shard,
            "image_size": self.image_size,
            "resize_mode": self.resize_mode,
        }
