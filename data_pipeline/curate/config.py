"""Typed configs of the curation stage, one per step, validated when built.

Every step has an `on` switch; the CLI maps `--no-<step>` and the step's options onto these. A
bad value is a `UserError` naming the option, before any shard is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.errors import UserError


@dataclass(frozen=True)
class NearDuplicateConfig:
    """hash_radius: Hamming distance (of 64 bits) at or under which two perceptual hashes are one
    image; 0 = only identical hashes. Measured here on 400 photo-like 128-px images: a JPEG
    re-encode at quality 60 moved the hash by <= 6 bits, a resize to 100 px by <= 4, while no
    two distinct images were closer than 12 (a 5% crop moved it by up to 20: phash is weak
    against crops, which the embedding check covers). Perceptual hashes are colour-blind and
    made for photos: on the demo's flat 64-px renders 24% of images have a *different* render
    within 2 bits, so there use the embedding check alone (--no-hash-dedup).
    by_pixels / pixel_threshold: the tiny-image check (16x16 RGB correlation), off by default:
    it is exact for re-encodes and resizes and sees colour, but two photos of one plain scene
    (sky, a white page) correlate too; on the noisy demo pool 0.95 separates copies (>= 0.958)
    from distinct renders (<= 0.943). embedding_threshold: cosine at or above which two image
    embeddings are one image (needs the embedding pass)."""

    by_hash: bool = True
    hash_radius: int = 6
    by_pixels: bool = False  # the tiny-image descriptor (scan.tiny_image): colour-aware
    pixel_threshold: float = 0.95
    by_embedding: bool = True
    embedding_threshold: float = 0.97
    index: str = "auto"  # auto | flat | ivfpq

    @property
    def on(self) -> bool:
        return self.by_hash or self.by_pixels or self.by_embedding

    def __post_init__(self) -> None:
        if not 0 <= self.hash_radius <= 16:
            raise UserError(f"--hash-radius must be in 0..16, got {self.hash_radius}")
        if not 0.0 < self.embedding_threshold <= 1.0:
            raise UserError(f"--dedup-threshold must be in (0, 1], got {self.embedding_threshold}")
        if self.index not in ("auto", "flat", "ivfpq"):
            raise UserError(f"--index must be auto, flat or ivfpq, got {self.index!r}")


@dataclass(frozen=True)
class AlignmentConfig:
    """Keep pairs whose CLIP score (cosine of image and text embedding) is >= threshold, or the
    top `top_fraction` of the pool by score (DataComp's baseline keeps the top 0.3). One of the
    two, not both."""

    on: bool = False
    threshold: float | None = None
    top_fraction: float | None = None

    def __post_init__(self) -> None:
        if not self.on:
            return
        if (self.threshold is None) == (self.top_fraction is None):
            raise UserError("the alignment filter needs exactly one of --clip-score-threshold "
                            "and --clip-score-top")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise UserError(f"--clip-score-threshold must be a cosine in [-1, 1], got {self.threshold}")
        if self.top_fraction is not None and not 0.0 < self.top_fraction <= 1.0:
            raise UserError(f"--clip-score-top must be in (0, 1], got {self.top_fraction}")


@dataclass(frozen=True)
class BalanceConfig:
    """MetaCLIP's balancing: `entries` is a file of metadata strings, one per line; a caption
    matches every entry it contains as a substring (case-insensitive, MetaCLIP matches the raw
    text); an entry matched by more than `per_entry` pairs keeps each with probability
    per_entry / count. `keep_unmatched`: MetaCLIP drops pairs matching no entry; off by default
    here too."""

    on: bool = False
    entries: Path | None = None
    per_entry: int = 20_000
    keep_unmatched: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.on:
            return
        if self.entries is None:
            raise UserError("balancing needs --balance-entries FILE (one metadata string per line)")
        if not Path(self.entries).is_file():
            raise UserError(f"--balance-entries {self.entries}: no such file")
        if self.per_entry < 1:
            raise UserError(f"--balance-per-entry must be >= 1, got {self.per_entry}")


@dataclass(frozen=True)
class EmbeddingConfig:
    """The CLIP that embeds the pool: one of our checkpoints (file or run folder), or an
    OpenAI/OpenCLIP file through the importer (`pretrained` + `model_name` + `bpe`)."""

    checkpoint: Path | None = None
    pretrained: Path | None = None
    model_name: str | None = None
    bpe: Path | None = None
    batch_size: int = 256
    workers: int = 1
    precision: str = "auto"

    @property
    def on(self) -> bool:
        return self.checkpoint is not None or self.pretrained is not None

    def __post_init__(self) -> None:
        if self.checkpoint is not None and self.pretrained is not None:
            raise UserError("--checkpoint and --pretrained are alternatives; give one")
        if self.pretrained is not None and (self.model_name is None or self.bpe is None):
            raise UserError("--pretrained needs --model (e.g. vit_b32_quickgelu) and --bpe "
                            "(CLIP's bpe_simple_vocab_16e6.txt.gz)")
        if self.batch_size < 1:
            raise UserError(f"--embed-batch-size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class DecontaminationConfig:
    """Eval sets whose images must not be in training: name -> path, read by eval's own readers
    (`demo` a demo root or shard folder, `cifar10`/`cifar100`, `imagenet`, `imagefolder`)."""

    sets: dict[str, Path] = field(default_factory=dict)
    by_hash: bool = True  # off for flat synthetic images (see NearDuplicateConfig)
    hash_radius: int = 6
    by_pixels: bool = False
    pixel_threshold: float = 0.95
    by_model: bool = True  # image-embedding cosine, when the embedding pass ran
    embedding_threshold: float = 0.95

    @property
    def on(self) -> bool:
        return bool(self.sets)

    def __post_init__(self) -> None:
        known = ("demo", "cifar10", "cifar100", "imagenet", "imagefolder")
        for name in self.sets:
            if name not in known:
                raise UserError(f"--decontaminate {name}=...: unknown eval set kind; use one of "
                                f"{', '.join(known)}")
        if not 0 <= self.hash_radius <= 16:
            raise UserError(f"--decontaminate-radius must be in 0..16, got {self.hash_radius}")


@dataclass(frozen=True)
class CurateConfig:
    shards: str
    out: Path
    exact_duplicates: bool = True
    captions: object = None  # a caption_filters.CaptionFilterConfig, or None = step off
    near_duplicates: NearDuplicateConfig = field(default_factory=NearDuplicateConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    decontamination: DecontaminationConfig = field(default_factory=DecontaminationConfig)
    bootstrap: object = None  # a bootstrap.BootstrapConfig (its own module: it runs the trainer)
    write_shards: bool = True
    grid_examples: int = 16
    workers: int = 2

    @property
    def has_model(self) -> bool:
        return self.embedding.on or (self.bootstrap is not None and self.bootstrap.on)

    def __post_init__(self) -> None:
        if self.bootstrap is not None and self.bootstrap.on and self.embedding.on:
            raise UserError("--bootstrap trains the filter model; it does not go with "
                            "--checkpoint or --pretrained")
        if self.alignment.on and not self.has_model:
            raise UserError("the alignment filter needs an embedding model: --checkpoint RUN, "
                            "--pretrained FILE or --bootstrap SEED_SHARDS")
        if self.decontamination.on and not (self.decontamination.by_hash or self.decontamination.by_pixels
                                            or self.has_model):
            raise UserError("decontamination without perceptual hashes needs an embedding model: "
                            "--checkpoint RUN or --pretrained FILE")
        if self.workers < 1:
            raise UserError(f"--workers must be >= 1, got {self.workers}")
