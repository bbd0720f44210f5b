"""The `[model]` section of a run: a named preset, an OpenCLIP model-config JSON, or either with
`[model.vision]` / `[model.text]` tables on top, plus the options users toggle per run.

    [model]                      # a 6-layer 256-wide ViT at the data's image size, no Python
    name = "tiny"                # the preset the tables start from
    embed_dim = 256
    [model.vision]
    timm_name = "vit_base_patch16_clip_224"
    width = 256                  # ViT shorthands for timm's embed_dim / depth / num_heads /
    layers = 6                   # patch_size / mlp_ratio; any other timm argument goes in
    heads = 4                    # timm_kwargs
    patch_size = 16
    [model.text]
    width = 256
    layers = 4
    heads = 4

or `model.openclip_config = "ViT-B-32.json"` (an OpenCLIP file as it is, see openclip_json.py).
The image size is always the run's `data.image_size`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from training.model.configs import MODEL_CONFIGS, TEXT_ACTIVATIONS, ClipModelConfig
from training.model.openclip_json import from_openclip_config, read_openclip_config

# [model.vision] shorthands -> timm VisionTransformer arguments.
_VIT_SHORTHANDS = {"width": "embed_dim", "layers": "depth", "heads": "num_heads",
                   "patch_size": "patch_size", "mlp_ratio": "mlp_ratio"}


@dataclass
class VisionTable:
    """`[model.vision]`: fields left unset keep the preset's."""

    timm_name: str | None = None
    timm_kwargs: dict[str, Any] | None = None  # replaces the preset's timm arguments
    width: int | None = None
    layers: int | None = None
    heads: int | None = None
    patch_size: int | None = None
    mlp_ratio: float | None = None
    init: str | None = None  # "clip" (OpenCLIP's ViT init) or "timm" (timm's own)

    def is_set(self) -> bool:
        return any(v is not None for v in dataclasses.asdict(self).values())


@dataclass
class TextTable:
    """`[model.text]`: fields left unset keep the preset's."""

    width: int | None = None
    layers: int | None = None
    heads: int | None = None
    context_length: int | None = None
    mlp_ratio: float | None = None
    activation: str | None = None

    def __post_init__(self) -> None:
        if self.activation is not None and self.activation not in TEXT_ACTIVATIONS:
            raise ValueError(f"model.text.activation must be one of {TEXT_ACTIVATIONS}")


@dataclass
class ModelChoice:
    """Which architecture a run trains (see the module docstring) and per-run switches."""

    name: str = "tiny"
    openclip_config: str = ""  # an OpenCLIP model-config JSON; replaces the preset `name`
    embed_dim: int | None = None
    vision: VisionTable = field(default_factory=VisionTable)
    text: TextTable = field(default_factory=TextTable)
    image_pretrained_path: str | None = None  # local timm-format weights for the image tower
    patch_dropout: float = 0.0  # FLIP: fraction of patch tokens dropped while training
    lock_image: bool = False  # LiT: freeze the image tower
    lock_text: bool = False
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.name not in MODEL_CONFIGS:
            raise ValueError(f"unknown model {self.name!r}; choose one of {', '.join(MODEL_CONFIGS)}")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"model.patch_dropout must lie in [0, 1), got {self.patch_dropout}")
        if self.lock_image and self.lock_text:
            raise ValueError("model.lock_image and model.lock_text together leave nothing to train")

    def label(self) -> str:
        """How the run header names the architecture."""
        base = f"OpenCLIP config {self.openclip_config}" if self.openclip_config else self.name
        custom = self.vision.is_set() or any(
            v is not None for v in dataclasses.asdict(self.text).values()) or self.embed_dim
        return f"{base} (with [model] tables)" if custom else base

    def architecture(self, image_size: int) -> ClipModelConfig:
        """The preset (or OpenCLIP file) with the tables applied, at `image_size`; ValueError
        (one line) for an architecture that cannot be built as asked."""
        if self.openclip_config:
            cfg = from_openclip_config(read_openclip_config(self.openclip_config),
                                       self.openclip_config)
            if cfg.vision.image_size != image_size:
                raise ValueError(
                    f"{self.openclip_config} says image_size {cfg.vision.image_size} but "
                    f"data.image_size is {image_size}; set data.image_size={cfg.vision.image_size}"
                )
        else:
            cfg = MODEL_CONFIGS[self.name]()
        vision = dataclasses.replace(cfg.vision, image_size=image_size,
                                     patch_dropout=self.patch_dropout or cfg.vision.patch_dropout,
                                     pretrained_path=self.image_pretrained_path)
        table = self.vision
        if table.timm_name is not None:
            # A new trunk gets the init that suits it unless the table says: CLIP's for timm's
            # ViTs (what OpenCLIP would train), timm's own for everything else.
            init = "clip" if table.timm_name.startswith("vit_") else "timm"
            vision = dataclasses.replace(vision, timm_name=table.timm_name, init=init)
        if table.timm_kwargs is not None:
            vision = dataclasses.replace(vision, timm_kwargs=dict(table.timm_kwargs))
        if table.init is not None:
            vision = dataclasses.replace(vision, init=table.init)
        shorthands = {timm_key: getattr(table, ours) for ours, timm_key in _VIT_SHORTHANDS.items()
                      if getattr(table, ours) is not None}
        if shorthands:
            vision = dataclasses.replace(vision, timm_kwargs={**vision.timm_kwargs, **shorthands})
        text_changes = {k: v for k, v in dataclasses.asdict(self.text).items() if v is not None}
        text = dataclasses.replace(cfg.text, **text_changes)
        cfg = dataclasses.replace(
            cfg, vision=vision, text=text, embed_dim=self.embed_dim or cfg.embed_dim,
            lock_image=self.lock_image, lock_text=self.lock_text,
            grad_checkpointing=self.grad_checkpointing,
        )
        cfg.__post_init__()  # re-validate the edited tree (e.g. width divisible by heads)
        return cfg
