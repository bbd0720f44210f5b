"""The OpenAI/OpenCLIP checkpoint layout, and how it maps onto ours (both ways).

OpenAI's CLIP and OpenCLIP's `CLIP` class share one state-dict layout (OpenCLIP kept OpenAI's
names). Our model holds the same tensors under other names:

    OpenAI / OpenCLIP                                 ours (training.model.CLIP)
    ------------------------------------------------  ----------------------------------------
    logit_scale                                       logit_scale
    token_embedding.weight                            text.token_embedding.weight
    positional_embedding          [ctx, W]            text.positional_embedding
    transformer.resblocks.i.ln_1.*                    text.blocks.i.ln_1.*
    transformer.resblocks.i.attn.in_proj_{weight,bias} text.blocks.i.attn.qkv.{weight,bias}
    transformer.resblocks.i.attn.out_proj.*           text.blocks.i.attn.out.*
    transformer.resblocks.i.ln_2.*                    text.blocks.i.ln_2.*
    transformer.resblocks.i.mlp.c_fc.*                text.blocks.i.mlp.0.*
    transformer.resblocks.i.mlp.c_proj.*              text.blocks.i.mlp.2.*
    ln_final.*                                        text.ln_final.*
    text_projection               [W, E]              text.proj.weight [E, W] (transposed)
    visual.proj                   [W, E]              visual.proj.weight [E, W] (transposed)
    visual.class_embedding        [W]                 visual.trunk.cls_token [1, 1, W]
    visual.positional_embedding   [N, W]              visual.trunk.pos_embed [1, N, W]
    visual.conv1.weight                               visual.trunk.patch_embed.proj.weight
    visual.ln_pre.* / visual.ln_post.*                visual.trunk.norm_pre.* / norm.*
    visual.transformer.resblocks.i.ln_1/ln_2.*        visual.trunk.blocks.i.norm1/norm2.*
    visual.transformer.resblocks.i.attn.in_proj_*     visual.trunk.blocks.i.attn.qkv.*
    visual.transformer.resblocks.i.attn.out_proj.*    visual.trunk.blocks.i.attn.proj.*
    visual.transformer.resblocks.i.mlp.c_fc/c_proj.*  visual.trunk.blocks.i.mlp.fc1/fc2.*

Both attentions pack q, k, v in that order into one [3W, W] matrix, so those copy unchanged.
Importing the image tower goes through timm's own OpenAI-CLIP converter (the ViT module's
`checkpoint_filter_fn`); the table's visual rows are the inverse we need for export, and the
round-trip test holds the two to each other.

The architectures that have this layout, and OpenCLIP's names for them, are in `ARCHITECTURES`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from training.model import CLIP
from training.model.configs import ClipModelConfig
from training.text.clip_vocab import CLIP_EOT_ID, CLIP_VOCAB_SIZE


@dataclass(frozen=True)
class Architecture:
    """One CLIP ViT both projects know: OpenCLIP's name for it and its sizes."""

    openclip_name: str
    patch_size: int
    width: int
    layers: int
    head_width: int = 64  # OpenCLIP's default: heads = width / head_width
    mlp_ratio: float = 4.0


# Keyed by the timm trunk name (what our config records). The `-quickgelu` twins differ only
# in the activation, which OpenCLIP's config says with `"quick_gelu": true`.
ARCHITECTURES: dict[str, Architecture] = {
    "vit_base_patch32_clip_224": Architecture("ViT-B-32", 32, 768, 12),
    "vit_base_patch16_clip_224": Architecture("ViT-B-16", 16, 768, 12),
    "vit_large_patch14_clip_224": Architecture("ViT-L-14", 14, 1024, 24),
    "vit_base_patch32_clip_quickgelu_224": Architecture("ViT-B-32-quickgelu", 32, 768, 12),
    "vit_base_patch16_clip_quickgelu_224": Architecture("ViT-B-16-quickgelu", 16, 768, 12),
    "vit_large_patch14_clip_quickgelu_224": Architecture("ViT-L-14-quickgelu", 14, 1024, 24),
}

# What OpenAI's released TorchScript files hold besides weights (OpenAI's loader drops them).
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")

# OpenAI's CLIP vocabulary: a checkpoint in this layout only makes sense with these ids.

_TEXT_BLOCK_RENAMES = (  # (OpenCLIP, ours) within one residual block of the text tower
    ("ln_1.", "ln_1."),
    ("attn.in_proj_weight", "attn.qkv.weight"),
    ("attn.in_proj_bias", "attn.qkv.bias"),
    ("attn.out_proj.", "attn.out."),
    ("ln_2.", "ln_2."),
    ("mlp.c_fc.", "mlp.0."),
    ("mlp.c_proj.", "mlp.2."),
)
_VISUAL_BLOCK_RENAMES = (  # (OpenCLIP, ours) within one residual block of the image trunk
    ("ln_1.", "norm1."),
    ("attn.in_proj_weight", "attn.qkv.weight"),
    ("attn.in_proj_bias", "attn.qkv.bias"),
    ("attn.out_proj.", "attn.proj."),
    ("ln_2.", "norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
)
_TEXT_RENAMES = {  # whole names outside the blocks, OpenCLIP -> ours
    "token_embedding.weight": "text.token_embedding.weight",
    "positional_embedding": "text.positional_embedding",
    "ln_final.weight": "text.ln_final.weight",
    "ln_final.bias": "text.ln_final.bias",
    "logit_scale": "logit_scale",
}
_TEXT_RENAMES_BACK = {ours: theirs for theirs, ours in _TEXT_RENAMES.items()}
_VISUAL_RENAMES = {  # ours -> OpenCLIP, outside the blocks; reshapes handled in `_to_openclip`
    "visual.trunk.patch_embed.proj.weight": "visual.conv1.weight",
    "visual.trunk.norm_pre.weight": "visual.ln_pre.weight",
    "visual.trunk.norm_pre.bias": "visual.ln_pre.bias",
    "visual.trunk.norm.weight": "visual.ln_post.weight",
    "visual.trunk.norm.bias": "visual.ln_post.bias",
}
_OPENCLIP_TEXT_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_OUR_TEXT_BLOCK = re.compile(r"^text\.blocks\.(\d+)\.(.+)$")
_OUR_VISUAL_BLOCK = re.compile(r"^visual\.trunk\.blocks\.(\d+)\.(.+)$")


def architecture_of(cfg: ClipModelConfig) -> Architecture:
    """The OpenCLIP architecture `cfg` is, or ValueError saying why it has none."""
    arch = ARCHITECTURES.get(cfg.vision.timm_name)
    if arch is None:
        raise ValueError(
            f"image tower {cfg.vision.timm_name!r} has no OpenAI/OpenCLIP layout; supported: "
            f"{', '.join(ARCHITECTURES)} (model names vit_b32, vit_b16, vit_l14 and their "
            "_quickgelu variants)"
        )
    quick = arch.openclip_name.endswith("-quickgelu")
    if quick != (cfg.text.activation == "quick_gelu"):
        raise ValueError(
            f"text activation {cfg.text.activation!r} does not match image tower "
            f"{cfg.vision.timm_name!r}: OpenCLIP uses one activation for both towers"
        )
    if cfg.vision.timm_kwargs or cfg.vision.image_size != 224:
        arch = _custom_vit(arch, cfg)
    if cfg.text.vocab_size != CLIP_VOCAB_SIZE or cfg.text.eot_id != CLIP_EOT_ID:
        raise ValueError(
            f"text vocabulary {cfg.text.vocab_size} (EOT {cfg.text.eot_id}) is not CLIP's BPE "
            f"({CLIP_VOCAB_SIZE}, EOT {CLIP_EOT_ID}); OpenCLIP models always use CLIP's tokenizer"
        )
    if cfg.init_logit_bias is not None:
        raise ValueError("a SigLIP logit bias has no place in OpenCLIP's CLIP layout")
    return arch


# timm arguments of a CLIP-layout ViT that OpenCLIP's vision_cfg can say too.
_CUSTOM_VIT_KWARGS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


def _custom_vit(standard: Architecture, cfg: ClipModelConfig) -> Architecture:
    """A CLIP-layout ViT of other sizes (an OpenCLIP model-config JSON of the user's own, e.g.
    through model.openclip_config): same tensor names, so the same layout, under a made-up
    OpenCLIP name that says its sizes."""
    kwargs = dict(cfg.vision.timm_kwargs)
    unknown = sorted(set(kwargs) - set(_CUSTOM_VIT_KWARGS))
    if unknown:
        raise ValueError(f"timm argument {unknown[0]!r} has no OpenCLIP vision_cfg equivalent")
    width = int(kwargs.get("embed_dim", standard.width))
    heads = int(kwargs.get("num_heads", width // standard.head_width))
    patch = int(kwargs.get("patch_size", standard.patch_size))
    layers = int(kwargs.get("depth", standard.layers))
    suffix = "-quickgelu" if standard.openclip_name.endswith("-quickgelu") else ""
    return Architecture(
        f"ViT-{layers}x{width}-p{patch}-{cfg.vision.image_size}px{suffix}", patch, width, layers,
        head_width=width // heads, mlp_ratio=float(kwargs.get("mlp_ratio", standard.mlp_ratio)),
    )


def openclip_model_config(cfg: ClipModelConfig) -> tuple[str, dict]:
    """(OpenCLIP model name, its model-config JSON) for one of our configs.

    The JSON is what OpenCLIP ships in open_clip/model_configs/NAME.json for the standard
    architectures (tested for equality), so `open_clip.create_model(NAME, pretrained=PATH)`
    needs nothing else; `open_clip.add_model_config(PATH_TO_JSON)` registers it otherwise.
    """
    arch = architecture_of(cfg)
    model_cfg: dict = {"embed_dim": cfg.embed_dim}
    if cfg.text.activation == "quick_gelu":
        model_cfg["quick_gelu"] = True
    model_cfg["vision_cfg"] = {
        "image_size": cfg.vision.image_size,
        "layers": arch.layers,
        "width": arch.width,
        "patch_size": arch.patch_size,
    }
    if arch.head_width != 64:
        model_cfg["vision_cfg"]["head_width"] = arch.head_width
    if arch.mlp_ratio != 4.0:
        model_cfg["vision_cfg"]["mlp_ratio"] = arch.mlp_ratio
    model_cfg["text_cfg"] = {
        "context_length": cfg.text.context_length,
        "vocab_size": cfg.text.vocab_size,
        "width": cfg.text.width,
        "heads": cfg.text.heads,
        "layers": cfg.text.layers,
    }
    return arch.openclip_name, model_cfg


# -- ours -> OpenCLIP ---------------------------------------------------------------------------


def to_openclip_state_dict(model: CLIP) -> dict[str, torch.Tensor]:
    """Our model's weights under OpenCLIP's names and shapes (fresh tensors, fp32 as stored)."""
    architecture_of(model.cfg)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key, value = _to_openclip(name, tensor)
        # contiguous copies: the transposed projections must be writable by safetensors too
        out[key] = value.detach().clone(memory_format=torch.contiguous_format)
    return out


def _to_openclip(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    if name == "text.proj.weight":
        return "text_projection", tensor.T
    if name == "visual.proj.weight":
        return "visual.proj", tensor.T
    if name == "visual.trunk.cls_token":
        return "visual.class_embedding", tensor.reshape(-1)
    if name == "visual.trunk.pos_embed":
        return "visual.positional_embedding", tensor.squeeze(0)
    if name in _VISUAL_RENAMES:
        return _VISUAL_RENAMES[name], tensor
    if name in _TEXT_RENAMES_BACK:
        return _TEXT_RENAMES_BACK[name], tensor
    if m := _OUR_TEXT_BLOCK.match(name):
        rest = _rename_prefix(m.group(2), [(b, a) for a, b in _TEXT_BLOCK_RENAMES], name)
        return f"transformer.resblocks.{m.group(1)}.{rest}", tensor
    if m := _OUR_VISUAL_BLOCK.match(name):
        rest = _rename_prefix(m.group(2), [(b, a) for a, b in _VISUAL_BLOCK_RENAMES], name)
        return f"visual.transformer.resblocks.{m.group(1)}.{rest}", tensor
    raise ValueError(f"{name}: no OpenCLIP counterpart (is this a CLIP ViT of ARCHITECTURES?)")


# -- OpenCLIP -> ours (text tower and temperature; the image tower goes through timm) ------------


def text_from_openclip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text tower and logit_scale of an OpenCLIP-layout state dict, under our names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == "text_projection":
            out["text.proj.weight"] = value.T
        elif key in _TEXT_RENAMES:
            out[_TEXT_RENAMES[key]] = value
        elif m := _OPENCLIP_TEXT_BLOCK.match(key):
            rest = _rename_prefix(m.group(2), _TEXT_BLOCK_RENAMES, key)
            out[f"text.blocks.{m.group(1)}.{rest}"] = value
    return out


def _rename_prefix(rest: str, renames, full_name: str) -> str:
    for old, new in renames:
        if rest.startswith(old):
            return new + rest[len(old):]
    raise ValueError(f"{full_name}: no counterpart in the other layout")
