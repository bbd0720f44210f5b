"""OpenCLIP model-config JSON files (`open_clip/model_configs/NAME.json`) as our ClipModelConfig.

OpenCLIP users keep architectures as such files: `embed_dim`, `vision_cfg`, `text_cfg` and a few
top-level switches (`quick_gelu`). We read them as they are:

  * `vision_cfg` with `layers`/`width`/`patch_size` (OpenCLIP's own ViT) becomes timm's CLIP-layout
    ViT (`vit_base_patch16_clip_224`: pre-norm before the blocks, class-token pooling after a final
    LayerNorm, as OpenCLIP's) with those sizes, initialised as OpenCLIP initialises it
    (`init="clip"`); heads = width / `head_width` (OpenCLIP's default 64);
  * `vision_cfg.timm_model_name` (OpenCLIP's timm towers) becomes our timm tower of that name;
  * `text_cfg` maps onto our text tower (`width`, `layers`, `heads`, `context_length`,
    `vocab_size`, `mlp_ratio`), and `quick_gelu` onto both towers' activation.

Not supported, refused in one line naming the key: ModifiedResNet image towers (`layers` as a
list), Hugging Face text towers (`hf_model_name`), and the switches our towers do not implement
(attentional pooling, non-default pooling types, no causal mask, class-token text pooling,
patch-token pooling, ...). Keys that only restate OpenCLIP's defaults are accepted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.config_loading import read_json_file
from training.model.configs import ClipModelConfig, TextConfig, VisionConfig

# OpenCLIP's CLIPVisionCfg / CLIPTextCfg defaults for the keys we accept without using them.
_VISION_DEFAULTS = {"head_width": 64, "mlp_ratio": 4.0, "ls_init_value": None,
                    "patch_dropout": 0.0, "attentional_pool": False, "pool_type": "tok",
                    "final_ln_after_pool": False, "no_ln_pre": False, "pos_embed_type": "learnable",
                    "output_tokens": False, "timm_pool": "avg", "timm_proj": "linear",
                    "timm_proj_bias": False, "timm_drop": 0.0, "timm_drop_path": None,
                    "timm_model_pretrained": False}
_TEXT_DEFAULTS = {"ls_init_value": None, "embed_cls": False, "pad_id": 0,
                  "no_causal_mask": False, "final_ln_after_pool": False, "pool_type": "argmax",
                  "proj_bias": False, "proj_type": "linear", "output_tokens": False,
                  "hf_model_name": None, "hf_tokenizer_name": None, "hf_pooler_type": None,
                  "hf_proj_type": None, "tokenizer_kwargs": None}
_VISION_USED = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio",
                "timm_model_name", "patch_dropout"}
_TEXT_USED = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
_TOP_LEVEL = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text",
              "init_logit_scale", "init_logit_bias"}


class OpenClipConfigError(ValueError):
    """The file is not an OpenCLIP model config we can build (one line, names the key)."""


def _unsupported(section: str, cfg: dict[str, Any], defaults: dict[str, Any], used: set[str],
                 where: str) -> None:
    for key, value in cfg.items():
        if key in used:
            continue
        if key in defaults and value == defaults[key]:
            continue  # restates OpenCLIP's default: nothing to do
        raise OpenClipConfigError(
            f"{where}: {section}.{key}={value!r} is not supported by our towers "
            f"(supported: {', '.join(sorted(used))})"
        )


def read_openclip_config(path: str | Path, option: str = "model.openclip_config") -> dict[str, Any]:
    data = read_json_file(path, option)
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in data]
    if missing:
        raise OpenClipConfigError(f"{path}: not an OpenCLIP model config (no {', '.join(missing)})")
    return data


def from_openclip_config(data: dict[str, Any], where: str = "OpenCLIP config") -> ClipModelConfig:
    """Our ClipModelConfig for an OpenCLIP model-config dict (see the module docstring)."""
    extra = sorted(set(data) - _TOP_LEVEL)
    if extra:
        raise OpenClipConfigError(f"{where}: top-level key {extra[0]!r} is not supported")
    vision_cfg, text_cfg = dict(data["vision_cfg"]), dict(data["text_cfg"])
    _unsupported("vision_cfg", vision_cfg, _VISION_DEFAULTS, _VISION_USED, where)
    _unsupported("text_cfg", text_cfg, _TEXT_DEFAULTS, _TEXT_USED, where)
    quick = bool(data.get("quick_gelu", False))
    image_size = vision_cfg.get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            raise OpenClipConfigError(f"{where}: non-square image_size {image_size} is not supported")
        image_size = image_size[0]
    if "timm_model_name" in vision_cfg:
        vision = VisionConfig(timm_name=vision_cfg["timm_model_name"], image_size=int(image_size),
                              patch_dropout=float(vision_cfg.get("patch_dropout", 0.0)))
    else:
        layers = vision_cfg.get("layers", 12)
        if isinstance(layers, (list, tuple)):
            raise OpenClipConfigError(
                f"{where}: vision_cfg.layers={layers} is OpenCLIP's ModifiedResNet, which our "
                f"timm towers do not reproduce; use model.name=rn50 (timm's ResNet-50) instead"
            )
        width = int(vision_cfg.get("width", 768))
        head_width = int(vision_cfg.get("head_width", 64))
        if width % head_width:
            raise OpenClipConfigError(f"{where}: vision width {width} is not a multiple of "
                                      f"head_width {head_width}")
        kwargs = dict(patch_size=int(vision_cfg.get("patch_size", 16)), embed_dim=width,
                      depth=int(layers), num_heads=width // head_width,
                      mlp_ratio=float(vision_cfg.get("mlp_ratio", 4.0)))
        # timm's quickgelu twin differs from the plain one only in the MLP activation.
        name = "vit_base_patch16_clip_quickgelu_224" if quick else "vit_base_patch16_clip_224"
        vision = VisionConfig(timm_name=name, image_size=int(image_size), timm_kwargs=kwargs,
                              patch_dropout=float(vision_cfg.get("patch_dropout", 0.0)),
                              init="clip")
    text = TextConfig(
        context_length=int(text_cfg.get("context_length", 77)),
        vocab_size=int(text_cfg.get("vocab_size", 49408)),
        width=int(text_cfg.get("width", 512)),
        heads=int(text_cfg.get("heads", 8)),
        layers=int(text_cfg.get("layers", 12)),
        mlp_ratio=float(text_cfg.get("mlp_ratio", 4.0)),
        activation="quick_gelu" if quick else "gelu",
    )
    extras: dict[str, Any] = {}
    if "init_logit_scale" in data:
        extras["init_logit_scale"] = float(data["init_logit_scale"])
    if data.get("init_logit_bias") is not None:
        extras["init_logit_bias"] = float(data["init_logit_bias"])
    return ClipModelConfig(embed_dim=int(data["embed_dim"]), vision=vision, text=text, **extras)
