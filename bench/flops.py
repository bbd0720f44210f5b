"""Model FLOPs of one CLIP training step, counted from the real (unpadded) caption lengths.

MFU = (FLOPs the model must do per sample x samples/s) / peak FLOP/s. Only the work the maths
needs counts: a caption of 9 tokens costs 9 tokens of text tower even when its batch is padded to
14 (ours) or 77 (OpenCLIP), so padding shows up as lost utilisation, not as extra credit.

Conventions (those of the PaLM / Megatron MFU papers): a multiply-add is 2 FLOPs; backward costs
twice the forward for every matmul whose input needs a gradient; attention scores and the
weighted sum count the full L x L square (as torch's FlopCounterMode does, causal or not);
norms, activations, softmax and the optimizer are not counted.

- Text tower: counted by formula from its config (`text_forward_flops`), per real length.
- Image tower: every image costs the same, so it is counted once by torch's FlopCounterMode on
  the real model (forward + backward of two images; any timm trunk works).
- Loss: the B x B logits matmul (per sample 2 * B * embed forward).

tests/test_bench_smoke.py checks the formula against a hand count and against FlopCounterMode.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from training.model.configs import ClipModelConfig, TextConfig

# Forward + backward where both the weight and the input need gradients.
TRAIN_FACTOR = 3


def transformer_layer_forward_flops(tokens: int, width: int, mlp_hidden: int) -> int:
    """One pre-norm block on one sequence: qkv, out, two MLP matmuls, and attention's two
    L x L x width products (scores and the weighted sum, all heads together)."""
    projections = 2 * tokens * width * (3 * width + width)
    mlp = 2 * tokens * width * mlp_hidden * 2
    attention = 2 * 2 * tokens * tokens * width
    return projections + mlp + attention


def text_forward_flops(text: TextConfig, embed_dim: int, length: int) -> int:
    """The text tower on one caption of `length` tokens (SOT and EOT included); the embedding
    lookup is free and only the pooled EOT row goes through the projection."""
    hidden = int(text.width * text.mlp_ratio)
    blocks = text.layers * transformer_layer_forward_flops(length, text.width, hidden)
    return blocks + 2 * text.width * embed_dim


def text_train_flops(text: TextConfig, embed_dim: int, lengths: Iterable[int]) -> float:
    """Mean training FLOPs per caption over `lengths` (real token counts)."""
    lengths = list(lengths)
    total = sum(text_forward_flops(text, embed_dim, n) for n in lengths)
    return TRAIN_FACTOR * total / len(lengths)


def loss_train_flops(batch_size: int, embed_dim: int) -> float:
    """Per sample: the logits row (2 * B * E forward; backward to both feature sets)."""
    return TRAIN_FACTOR * 2 * batch_size * embed_dim


def _model_flops_only():
    """Attention as plain matmuls: a fused (flash) kernel recomputes the scores in backward,
    and FlopCounterMode would count that recomputation (2.5x forward instead of 2x)."""
    return sdpa_kernel(SDPBackend.MATH)


def image_train_flops(model: torch.nn.Module, image_size: int) -> float:
    """Per image, forward + backward of the image tower, counted by FlopCounterMode. The input
    needs no gradient, so the first layer's backward is counted as torch does it (weights only)."""
    visual = model.visual
    images = torch.randn(2, 3, image_size, image_size)
    was_training = visual.training
    visual.train()
    with _model_flops_only(), FlopCounterMode(display=False) as counter:
        visual(images).float().pow(2).sum().backward()
    visual.train(was_training)
    visual.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def train_flops_per_sample(
    model: torch.nn.Module, cfg: ClipModelConfig, text_lengths: Iterable[int], batch_size: int
) -> dict[str, float]:
    """The per-sample FLOPs of a training step, by part, with their total under "total"."""
    parts = {
        "image": image_train_flops(model, cfg.vision.image_size),
        "text": text_train_flops(cfg.text, cfg.embed_dim, text_lengths),
        "loss": loss_train_flops(batch_size, cfg.embed_dim),
    }
    parts["total"] = sum(parts.values())
    return parts


def counted_text_train_flops(text_tower: torch.nn.Module, tokens: torch.Tensor) -> float:
    """FlopCounterMode's count for the text tower on `tokens` (B, L), per caption: the check
    that `text_train_flops` describes the module we actually train."""
    with _model_flops_only(), FlopCounterMode(display=False) as counter:
        text_tower(tokens).float().pow(2).sum().backward()
    text_tower.zero_grad(set_to_none=True)
    return counter.get_total_flops() / tokens.shape[0]


def mfu(samples_per_s: float, flops_per_sample: float, peak_flops_per_s: float) -> float:
    """Model FLOP utilisation: the share of the peak that the model's own FLOPs would take."""
    return samples_per_s * flops_per_sample / peak_flops_per_s
