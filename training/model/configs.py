"""Typed model configs and the named model zoo.

A named config is a function returning a `ClipModelConfig`; the tokenizer fills in the text
vocabulary afterwards (`with_tokenizer`), so the same name works with CLIP's BPE or with a small
tokenizer trained on our own captions. Sizes of the CLIP-scale configs follow OpenCLIP's
published model configs (ViT-S-32, ViT-B-32, ViT-B-16, ViT-L-14, RN50) for the text tower and
embedding width; the image towers are the closest timm architectures (see each docstring). The
CLIP ViTs (vit_b32, vit_b16, vit_l14 and their `_quickgelu` variants) have exactly OpenAI's
layout, so OpenAI/OpenCLIP checkpoints load into them (training.interop).

Typical use:
    cfg = with_tokenizer(MODEL_CONFIGS["tiny"](), tokenizer)
    model = build_model(cfg)          # training.model.build_model
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from training.text.clip_vocab import CLIP_EOT_ID, CLIP_VOCAB_SIZE

if TYPE_CHECKING:
    from training.text.tokenizer import Tokenizer

# timm kwargs the image tower sets itself; letting a config set them too would be ambiguous.
_RESERVED_TIMM_KWARGS = ("num_classes", "pretrained", "img_size", "patch_drop_rate")
TEXT_ACTIVATIONS = ("gelu", "quick_gelu")


VISION_INITS = ("timm", "clip")


@dataclass
class VisionConfig:
    """Image tower: any timm model, created headless, plus a linear projection.

    `image_size` is passed to timm as `img_size` for models that take it (ViTs size their
    position embedding with it); convnets take any resolution. `patch_dropout` (FLIP, Li et al.
    2023) is the fraction of patch tokens dropped in training; ViT towers only.

    `init`: "timm" keeps timm's initialisation; "clip" re-initialises a timm ViT the way
    OpenAI's CLIP and OpenCLIP initialise their ViT (image_tower.clip_vit_init). Measured here:
    with everything else equal, a 4 x 128 ViT-CLIP trained 156 steps on the demo corpus reached
    loss 2.04 with "clip" against 2.45 with "timm" (OpenCLIP's own model: 1.90); see
    bench/sample_efficiency.md.
    """

    timm_name: str
    image_size: int
    pretrained_path: str | None = None
    patch_dropout: float = 0.0
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    init: str = "timm"

    def __post_init__(self) -> None:
        if not self.timm_name:
            raise ValueError("VisionConfig.timm_name must name a timm model")
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {self.patch_dropout}")
        if self.init not in VISION_INITS:
            raise ValueError(f"vision init must be one of {VISION_INITS}, got {self.init!r}")
        clash = [k for k in _RESERVED_TIMM_KWARGS if k in self.timm_kwargs]
        if clash:
            raise ValueError(f"timm_kwargs may not set {clash}: use the VisionConfig fields")


@dataclass
class TextConfig:
    """CLIP text transformer. Defaults are CLIP's (512 wide, 12 layers, 8 heads, its BPE ids).

    `vocab_size`, `eot_id` and `pad_id` belong to the tokenizer: set them with `with_tokenizer`.
    `pad_id` is not used by the maths (attention is causal and pooling happens at the first EOT,
    so nothing after EOT matters); it is recorded so a saved config describes its tokenizer.
    `activation` is the MLP non-linearity: "gelu" (exact GELU), or "quick_gelu"
    (x * sigmoid(1.702 x), the approximation OpenAI trained its CLIP weights with; those weights
    need it back to reproduce their embeddings).
    """

    vocab_size: int = CLIP_VOCAB_SIZE
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    eot_id: int = CLIP_EOT_ID
    pad_id: int = 0
    # A default, so configs saved before this field existed still load as what they were.
    activation: str = "gelu"

    def __post_init__(self) -> None:
        if self.activation not in TEXT_ACTIVATIONS:
            raise ValueError(
                f"TextConfig.activation {self.activation!r} unknown; choose from {TEXT_ACTIVATIONS}"
            )
        for name in ("vocab_size", "context_length", "width", "layers", "heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TextConfig.{name} must be positive, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        for name in ("eot_id", "pad_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name}={getattr(self, name)} outside vocab of {self.vocab_size}")


@dataclass
class ClipModelConfig:
    """Two towers projected to `embed_dim`, plus the learned temperature (and SigLIP bias).

    `init_logit_scale` is log(1/temperature): CLIP starts at log(1/0.07). A non-None
    `init_logit_bias` adds SigLIP's learned bias (use `for_siglip`). `lock_image`/`lock_text`
    freeze a tower (LiT, Zhai et al. 2022).
    """

    embed_dim: int
    vision: VisionConfig
    text: TextConfig
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None
    lock_image: bool = False
    lock_text: bool = False
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        # Nested dicts (from a saved config) become configs; existing ones are re-validated, so
        # calling __post_init__ again after editing fields in place checks the whole tree.
        self.vision = VisionConfig(**self.vision) if isinstance(self.vision, dict) else self.vision
        self.text = TextConfig(**self.text) if isinstance(self.text, dict) else self.text
        self.vision.__post_init__()
        self.text.__post_init__()
        if self.embed_dim <= 0:
            raise ValueError(f"embed_dim must be positive, got {self.embed_dim}")
        if not math.isfinite(self.init_logit_scale):
            raise ValueError("init_logit_scale must be finite")
        if self.init_logit_bias is not None and not math.isfinite(self.init_logit_bias):
            raise ValueError("init_logit_bias must be finite or None")
        if self.lock_image and self.lock_text:
            raise ValueError(
                "lock_image and lock_text together leave only the temperature to train"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClipModelConfig:
        """Inverse of `to_dict`; unknown keys raise (dataclass constructors reject them)."""
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def with_tokenizer(cfg: ClipModelConfig, tokenizer: Tokenizer) -> ClipModelConfig:
    """Copy of `cfg` whose text tower matches `tokenizer` (vocab size, EOT and pad ids)."""
    if tokenizer.context_length > cfg.text.context_length:
        raise ValueError(
            f"tokenizer context_length {tokenizer.context_length} exceeds the text tower's "
            f"{cfg.text.context_length} positions"
        )
    text = dataclasses.replace(
        cfg.text, vocab_size=tokenizer.vocab_size, eot_id=tokenizer.eot_id, pad_id=tokenizer.pad_id
    )
    return dataclasses.replace(cfg, text=text)


def for_siglip(cfg: ClipModelConfig) -> ClipModelConfig:
    """SigLIP's starting point (Zhai et al. 2023): temperature 10 and bias -10, so the sigmoid
    loss starts near its no-information value instead of being swamped by the negatives."""
    return dataclasses.replace(cfg, init_logit_scale=math.log(10.0), init_logit_bias=-10.0)


# -- named configs ------------------------------------------------------------------------------


def tiny() -> ClipModelConfig:
    """CPU demo: 64-px images, ViT with 8-px patches (64 tokens), 4 layers x 128 wide; text 3 x 128.

    ~2 M parameters with a 4k-token BPE (image 0.84 M, text 0.63 M + vocab x 128); one
    forward+backward of a 64-sample batch takes ~0.3 s on 2 CPU cores. Sized to learn the
    procedural-shapes demo corpus in minutes; not meant to transfer.
    """
    return ClipModelConfig(
        embed_dim=128,
        vision=VisionConfig(
            timm_name="vit_tiny_patch16_224",
            image_size=64,
            timm_kwargs=dict(patch_size=8, embed_dim=128, depth=4, num_heads=4),
            init="clip",
        ),
        text=TextConfig(width=128, layers=3, heads=4),
    )


def tiny_cnn() -> ClipModelConfig:
    """The demo's model: `tiny`'s text tower with a slim ResNet-10-T image tower (channels
    32-256, ~1.2 M parameters). On the 64-px shapes corpus it learns colour and shape in far
    fewer steps than the tiny ViT (measured here: after 150 steps of batch 64, zero-shot colour
    accuracy 0.84 vs 0.23), since convolutions bring the locality prior a ViT must learn."""
    return ClipModelConfig(
        embed_dim=128,
        vision=VisionConfig(
            timm_name="resnet10t",
            image_size=64,
            timm_kwargs=dict(channels=(32, 64, 128, 256), stem_width=16),
        ),
        text=TextConfig(width=128, layers=3, heads=4),
    )


def vit_s32() -> ClipModelConfig:
    """OpenCLIP ViT-S-32 sizes: embed 384; image timm vit_small_patch32_224 (384 wide, 12 layers,
    6 heads); text 384 wide, 12 layers, 6 heads."""
    return ClipModelConfig(
        embed_dim=384,
        vision=VisionConfig(timm_name="vit_small_patch32_224", image_size=224, init="clip"),
        text=TextConfig(width=384, layers=12, heads=6),
    )


def vit_b32() -> ClipModelConfig:
    """CLIP ViT-B/32: embed 512; timm's CLIP-layout ViT-B/32 (pre-norm before the blocks, as
    OpenAI's); text 512 wide, 12 layers, 8 heads. ~151 M parameters with CLIP's vocab."""
    return ClipModelConfig(
        embed_dim=512,
        vision=VisionConfig(timm_name="vit_base_patch32_clip_224", image_size=224, init="clip"),
        text=TextConfig(width=512, layers=12, heads=8),
    )


def vit_b16() -> ClipModelConfig:
    """CLIP ViT-B/16: as `vit_b32` with 16-px patches (196 tokens, ~4.4x the image FLOPs)."""
    return ClipModelConfig(
        embed_dim=512,
        vision=VisionConfig(timm_name="vit_base_patch16_clip_224", image_size=224, init="clip"),
        text=TextConfig(width=512, layers=12, heads=8),
    )


def vit_l14() -> ClipModelConfig:
    """CLIP ViT-L/14: embed 768; timm's CLIP-layout ViT-L/14 (1024 wide, 24 layers, 16 heads,
    256 patch tokens); text 768 wide, 12 layers, 12 heads. ~428 M parameters with CLIP's vocab."""
    return ClipModelConfig(
        embed_dim=768,
        vision=VisionConfig(timm_name="vit_large_patch14_clip_224", image_size=224, init="clip"),
        text=TextConfig(width=768, layers=12, heads=12),
    )


def _quickgelu(base: Callable[[], ClipModelConfig]) -> Callable[[], ClipModelConfig]:
    """`base` with QuickGELU in both towers: the activation OpenAI's released CLIP weights were
    trained with (OpenCLIP's `-quickgelu` models). timm names the variant `*_clip_quickgelu_*`."""

    def make() -> ClipModelConfig:
        cfg = base()
        timm_name = cfg.vision.timm_name.replace("_clip_", "_clip_quickgelu_")
        return dataclasses.replace(
            cfg,
            vision=dataclasses.replace(cfg.vision, timm_name=timm_name),
            text=dataclasses.replace(cfg.text, activation="quick_gelu"),
        )

    make.__name__ = f"{base.__name__}_quickgelu"
    make.__doc__ = f"`{base.__name__}` with QuickGELU (for OpenAI's weights; see `_quickgelu`)."
    return make


def rn50() -> ClipModelConfig:
    """CLIP RN50 sizes (embed 1024, text 512/12/8) on timm's plain resnet50. Unlike OpenAI's
    modified ResNet (3-conv stem, anti-aliased strides, attention pooling) it average-pools."""
    return ClipModelConfig(
        embed_dim=1024,
        vision=VisionConfig(timm_name="resnet50", image_size=224),
        text=TextConfig(width=512, layers=12, heads=8),
    )


MODEL_CONFIGS: dict[str, Callable[[], ClipModelConfig]] = {
    "tiny": tiny,
    "tiny_cnn": tiny_cnn,
    "vit_s32": vit_s32,
    "vit_b32": vit_b32,
    "vit_b16": vit_b16,
    "vit_l14": vit_l14,
    # OpenAI CLIP checkpoints (and OpenCLIP's -quickgelu ones) need these to load exactly.
    "vit_b32_quickgelu": _quickgelu(vit_b32),
    "vit_b16_quickgelu": _quickgelu(vit_b16),
    "vit_l14_quickgelu": _quickgelu(vit_l14),
    "rn50": rn50,
}
