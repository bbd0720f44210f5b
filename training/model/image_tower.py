"""Image tower: a headless timm model followed by a linear projection into the joint space."""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable

import timm
import torch
from torch import nn

from training.model.configs import VisionConfig

log = logging.getLogger(__name__)


class ImageTower(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.trunk = _create_trunk(cfg)
        if cfg.init == "clip":
            clip_vit_init(self.trunk)
        if cfg.pretrained_path:
            load_trunk_weights(self.trunk, cfg.pretrained_path)
        # Bias-free like CLIP's projection matrices: features are L2-normalised downstream, so a
        # bias would only shift every embedding by the same vector.
        self.proj = nn.Linear(self.trunk.num_features, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=self.trunk.num_features**-0.5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.trunk(images))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """Trunk parameters timm marks as embeddings (pos_embed, cls_token, ...), tower-relative."""
        names = self.trunk.no_weight_decay() if hasattr(self.trunk, "no_weight_decay") else set()
        return {f"trunk.{n}" for n in names}


def _create_trunk(cfg: VisionConfig) -> nn.Module:
    # pretrained=False always: weights come from a local file or nowhere, never from the hub.
    kwargs: dict[str, Any] = dict(cfg.timm_kwargs, num_classes=0, pretrained=False)
    if cfg.patch_dropout > 0:
        # timm's VisionTransformer has FLIP patch dropout built in: after the position
        # embedding, keep a random (1 - p) of the patch tokens per sample, prefix (CLS/register)
        # tokens always kept, only in training mode.
        kwargs["patch_drop_rate"] = cfg.patch_dropout
    try:
        # ViTs need the resolution to size their position embedding.
        trunk = timm.create_model(cfg.timm_name, img_size=cfg.image_size, **kwargs)
    except TypeError as err:
        # timm forwards kwargs to the model class and convnets take any resolution, so they
        # reject `img_size`; there is no way to ask the class before building it.
        if "img_size" not in str(err):
            raise
        try:
            trunk = timm.create_model(cfg.timm_name, **kwargs)
        except TypeError as err2:
            if "patch_drop_rate" in str(err2):
                raise ValueError(
                    f"{cfg.timm_name} has no patch dropout; it needs a timm ViT"
                ) from err2
            raise
    if cfg.patch_dropout > 0 and not hasattr(trunk, "patch_drop"):
        raise ValueError(f"{cfg.timm_name} ignored patch_drop_rate; patch dropout needs a timm ViT")
    return trunk


def clip_vit_init(trunk: nn.Module) -> None:
    """Initialise a timm VisionTransformer as OpenAI's CLIP ViT is initialised (and OpenCLIP's,
    which keeps it): class and position embeddings ~ N(0, width^-1/2); patch convolution, MLPs and
    the attention output with PyTorch's default (Kaiming-uniform) init; the fused q/k/v matrix
    Xavier-uniform with zero bias, as nn.MultiheadAttention does; norms at identity.

    Why not timm's own (every linear N(0, 0.02), position embedding N(0, 0.02), class token ~0):
    at CLIP's widths those are several times smaller than CLIP's (width 128: 0.09 for the
    embeddings, 0.05-0.06 for the projections), and from that start the same ViT learned
    measurably less per sample than OpenCLIP's (see VisionConfig.init).
    """
    blocks = getattr(trunk, "blocks", None)
    if not hasattr(trunk, "pos_embed") or blocks is None or not all(
        hasattr(block, "attn") and hasattr(block.attn, "qkv") for block in blocks
    ):
        raise ValueError(
            f"model vision init 'clip' needs a timm VisionTransformer, not {type(trunk).__name__}"
        )
    for module in trunk.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.reset_parameters()
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    for block in blocks:
        nn.init.xavier_uniform_(block.attn.qkv.weight)
        if block.attn.qkv.bias is not None:
            nn.init.zeros_(block.attn.qkv.bias)
        if block.attn.proj.bias is not None:
            nn.init.zeros_(block.attn.proj.bias)
    scale = trunk.embed_dim**-0.5
    for name in ("cls_token", "reg_token", "pos_embed"):
        embedding = getattr(trunk, name, None)
        if isinstance(embedding, nn.Parameter):
            nn.init.normal_(embedding, std=scale)


def load_trunk_weights(trunk: nn.Module, path: str) -> None:
    """Load a local timm-format checkpoint (.pth/.bin/.safetensors/.npz) into a headless trunk.

    Goes through `trunk_checkpoint_filter` (timm's own layout conversion); everything else must
    match exactly.
    """
    timm.models.load_checkpoint(trunk, path, strict=True, filter_fn=trunk_checkpoint_filter(trunk))
    log.info("loaded image trunk weights from %s", path)


def trunk_checkpoint_filter(
    trunk: nn.Module,
) -> Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]:
    """A function turning a foreign state dict into `trunk`'s layout, timm's way.

    The model module's own `checkpoint_filter_fn` runs first (it converts foreign layouts, e.g.
    OpenAI CLIP ViTs, and resizes position embeddings to our image size); classifier weights
    are then dropped since the trunk has none.
    """
    module_filter = getattr(sys.modules[type(trunk).__module__], "checkpoint_filter_fn", None)
    classifier = getattr(trunk, "pretrained_cfg", {}).get("classifier") or "head"
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    own_keys = set(trunk.state_dict())

    def filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        if module_filter is not None:
            state_dict = module_filter(state_dict, model)
        return {
            k: v
            for k, v in state_dict.items()
            if k in own_keys or not any(k == c or k.startswith(c + ".") for c in classifiers)
        }

    return filter_fn
