"""CLIP: image tower + text tower + learned temperature (and SigLIP bias).

Knows nothing of DDP, precision or losses: `forward` returns features and the logit scale, the
loss (training/losses/contrastive.py) turns them into a number.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training.model.configs import ClipModelConfig
from training.model.image_tower import ImageTower
from training.model.text_tower import TextTower

# CLIP clips the temperature at 100 so the logits cannot blow up (Radford et al. 2021, 2.5).
MAX_LOGIT_SCALE = 100.0


class CLIP(nn.Module):
    def __init__(self, cfg: ClipModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = ImageTower(cfg.vision, cfg.embed_dim)
        self.text = TextTower(cfg.text, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(cfg.init_logit_bias)))
            if cfg.init_logit_bias is not None
            else None
        )
        if cfg.grad_checkpointing:
            self.set_grad_checkpointing(True)
        if cfg.lock_image:
            self.visual.requires_grad_(False)
        if cfg.lock_text:
            self.text.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> CLIP:
        super().train(mode)
        # A locked tower stays in eval mode: no dropout / patch dropout, BatchNorm statistics
        # frozen along with the weights (LiT).
        if self.cfg.lock_image:
            self.visual.eval()
        if self.cfg.lock_text:
            self.text.eval()
        return self

    def set_fused_attention(self, enable: bool) -> None:
        """Fused scaled_dot_product_attention kernels (flash / memory-efficient) in both towers,
        or the plain matmul-softmax-matmul path. Same maths; which is faster depends on the
        device, so the trainer chooses (on CPU the plain path measured faster at CLIP's short
        sequences). Every module with timm's `fused_attn` switch follows, ours included."""
        for module in self.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = enable

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        # A frozen tower needs no autograd graph: skipping it saves the activation memory.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.lock_image):
            features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.lock_text):
            features = self.text(text)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor | None]:
        return {
            "image_features": self.encode_image(images),
            "text_features": self.encode_text(text),
            # Clamping the log keeps the gradient at zero above the cap, like clipping the
            # parameter after each step would, without touching the optimizer.
            "logit_scale": self.logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp(),
            "logit_bias": self.logit_bias,
        }


def build_model(cfg: ClipModelConfig) -> CLIP:
    return CLIP(cfg)


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names of trainable parameters that should get weight decay 0.

    Biases and norm gains (every parameter with fewer than 2 dims, which also covers
    logit_scale/logit_bias), and embeddings: token and positional embeddings of the text tower,
    and what the timm trunk lists as such (pos_embed, cls_token, ...). Decaying them pulls
    them towards zero for no regularisation benefit. Takes the bare model: the optimizer is
    built before the engine wraps it (training.parallel.engines), so names carry no prefix.
    """
    if not isinstance(model, CLIP):
        raise TypeError(f"expected the bare CLIP model, got {type(model).__name__}")
    embeddings = {f"visual.{n}" for n in model.visual.no_weight_decay()}
    embeddings |= {f"text.{n}" for n in model.text.no_weight_decay()}
    return {
        name
        for name, param in model.named_parameters()
        if param.requires_grad and (param.ndim < 2 or name in embeddings)
    }


def param_groups_for_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups: decayed weights, and `no_weight_decay_names` at weight_decay 0.
    Frozen (locked) parameters are left out."""
    skip = no_weight_decay_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
