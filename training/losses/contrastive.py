"""Contrastive losses over (possibly rank-sharded) batches of paired image/text features.

All losses share one signature, `loss_fn(image_features, text_features, logit_scale,
logit_bias=None) -> scalar`, take L2-normalised (B_local, D) features, and compute logits in fp32
with autocast off (bf16 logits lose the small differences the softmax cares about).

Distributed scaling, the same for every loss here: each rank scores ITS OWN rows (its images
against all gathered texts, and its texts against all gathered images) and normalises by its
local batch size. Then
  * the mean over ranks of the returned losses equals the single-process loss on the
    concatenated global batch (the trainer's `sum_over_ranks` / world size), and
  * with `gather_features_with_grad` (gradients of a rank's rows summed over all ranks' losses)
    and DDP's gradient averaging, parameters get exactly the global-batch loss gradient.
tests/test_losses.py checks both with real 2- and 4-process gloo runs.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from training.parallel.collectives import gather_features_with_grad, world_info

def _fp32(features: torch.Tensor) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=features.device.type, enabled=False)


def _local_diagonal(rows: int, rank: int, device: torch.device) -> torch.Tensor:
    # Our row i is pair number rank * rows + i of the gathered (global) batch.
    return torch.arange(rows, device=device) + rank * rows


class ClipLoss(nn.Module):
    """Symmetric InfoNCE: mean over both directions of the cross-entropy of each image against
    all texts (and each text against all images), the matching pair being the target."""

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        with _fp32(image_features):
            image, text = image_features.float(), text_features.float()
            rank, _ = world_info()
            all_image = gather_features_with_grad(image)  # (world * B, D)
            all_text = gather_features_with_grad(text)
            scale = logit_scale.float()
            logits_per_image = scale * image @ all_text.T  # (B, world * B)
            logits_per_text = scale * text @ all_image.T
            if logit_bias is not None:
                # A constant shift leaves softmax unchanged; adding it keeps the parameter in
                # the graph so DDP does not flag it as unused.
                logits_per_image = logits_per_image + logit_bias.float()
                logits_per_text = logits_per_text + logit_bias.float()
            labels = _local_diagonal(image.shape[0], rank, image.device)
            return (
                F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
            ) / 2


def require_logit_bias(logit_bias: torch.Tensor | None) -> None:
    if logit_bias is None:
        raise ValueError("SigLipLoss needs a logit bias: build the model with for_siglip(cfg)")


class SigLipLoss(nn.Module):
    """Sigmoid loss (SigLIP): every image-text pair is an independent binary problem,
    -sum_ij log sigmoid(z_ij * (t * x_i . y_j + b)) / |B| with z_ij = 1 for matching pairs and -1
    otherwise, |B| the global batch (the paper's normalisation). Each rank scores its own
    images against all texts, so every pair is counted exactly once across ranks."""

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        require_logit_bias(logit_bias)
        with _fp32(image_features):
            image, text = image_features.float(), text_features.float()
            rank, _ = world_info()
            all_text = gather_features_with_grad(text)  # (world * B, D)
            logits = logit_scale.float() * image @ all_text.T + logit_bias.float()  # (B, world * B)
            rows = image.shape[0]
            signs = -torch.ones_like(logits)
            matching = _local_diagonal(rows, rank, image.device)
            signs[torch.arange(rows, device=image.device), matching] = 1.0
            # Dividing by the LOCAL batch: the mean over ranks then divides by the global one.
            return -F.logsigmoid(signs * logits).sum() / rows


class SoftTargetClipLoss(nn.Module):
    """InfoNCE whose targets are soft: near-duplicate pairs in the batch share the credit.

    targets = softmax(s_t * (sim_image_image + sim_text_text) / 2) over the global batch, with
    sim the cosine similarities of the (detached) features and s_t = `target_scale` or the
    model's current logit scale. The diagonal has similarity 1 in both terms, so for distinct
    pairs the target is nearly one-hot (plain CLIP loss); two captions "a red circle" attached
    to two similar images pull towards each other instead of being pushed apart as negatives.
    Targets are a stop-gradient: the loss never trains the features to agree with their own
    targets. The same target matrix (symmetric) serves both directions.
    """

    def __init__(self, target_scale: float | None = None) -> None:
        super().__init__()
        self.target_scale = target_scale

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        with _fp32(image_features):
            image, text = image_features.float(), text_features.float()
            all_image = gather_features_with_grad(image)  # (world * B, D)
            all_text = gather_features_with_grad(text)
            scale = logit_scale.float()
            logits_per_image = scale * image @ all_text.T  # (B, world * B)
            logits_per_text = scale * text @ all_image.T
            if logit_bias is not None:  # a no-op for softmax; see ClipLoss
                logits_per_image = logits_per_image + logit_bias.float()
                logits_per_text = logits_per_text + logit_bias.float()
            with torch.no_grad():
                target_scale = (
                    self.target_scale if self.target_scale is not None else scale.detach()
                )
                similarity = (image @ all_image.T + text @ all_text.T) / 2
                targets = torch.softmax(target_scale * similarity, dim=-1)
            return (
                F.cross_entropy(logits_per_image, targets)
                + F.cross_entropy(logits_per_text, targets)
            ) / 2
