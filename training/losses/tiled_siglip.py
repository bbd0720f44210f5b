"""Memory-linear SigLIP loss: SigLipLoss's value and gradients, tile by tile (the method is in
tiled_clip.py's docstring). The loss is a sum of independent per-pair terms, so each tile's
contribution is final as soon as it is computed; one ring pass carries the texts."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.losses.contrastive import require_logit_bias
from training.losses.ring import (
    GradientRelay,
    RingPass,
    TiledLoss,
    Tiles,
    compute_dtype,
    no_autocast,
    tile_dots,
)


def _signed_logits(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    span: tuple[int, int, int, int],
    own_block: bool,
    tiles: Tiles,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """(dots, z * logits, diagonal) of one SigLIP tile, in the scratch buffers: z = +1 for
    matching pairs, which are the diagonal of the rank's own block, else -1. `diagonal`: the
    matching pairs' (row, col) indices inside the tile, or None."""
    r0, r1, c0, c1 = span
    dots, signed, _ = tiles.scratch(r1 - r0, c1 - c0)
    tile_dots(rows[r0:r1], cols[c0:c1], dots)
    torch.mul(dots, scale, out=signed).add_(bias).neg_()
    first, last = max(r0, c0), min(r1, c1)
    diagonal = None
    if own_block and first < last:
        index = torch.arange(first, last, device=rows.device)
        diagonal = (index - r0, index - c0)
        signed[diagonal] = -signed[diagonal]
    return dots, signed, diagonal


def _block_sigmoid_loss(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    own_block: bool,
    tiles: Tiles,
) -> torch.Tensor:
    """sum_ij -log sigmoid(z_ij * (scale * rows_i . cols_j + bias)), as a 0-dim tensor."""
    total = torch.zeros((), dtype=rows.dtype, device=rows.device)
    for r0, r1 in tiles.spans(rows.shape[0]):
        for c0, c1 in tiles.spans(cols.shape[0]):
            span = (r0, r1, c0, c1)
            _, signed, _ = _signed_logits(rows, cols, scale, bias, span, own_block, tiles)
            total -= F.logsigmoid(signed).sum()
    return total


def _block_sigmoid_loss_backward(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    grad_loss: torch.Tensor,
    own_block: bool,
    grad_rows: torch.Tensor,
    grad_cols: torch.Tensor,
    tiles: Tiles,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of grad_loss * _block_sigmoid_loss: with G_ij = dloss/dlogit_ij = grad_loss *
    -z_ij * sigmoid(-z_ij * logit_ij), adds scale * G @ cols to grad_rows and scale * G^T @ rows
    to grad_cols, returns (dloss/dscale, dloss/dbias)."""
    grad_scale = torch.zeros((), dtype=rows.dtype, device=rows.device)
    grad_bias = torch.zeros((), dtype=rows.dtype, device=rows.device)
    for r0, r1 in tiles.spans(rows.shape[0]):
        for c0, c1 in tiles.spans(cols.shape[0]):
            span = (r0, r1, c0, c1)
            dots, signed, diagonal = _signed_logits(
                rows, cols, scale, bias, span, own_block, tiles
            )
            # sigmoid(-z*l) computed directly: 1 - sigmoid(z*l) would cancel for confident pairs
            weights = signed.neg_().sigmoid_()
            if diagonal is not None:
                weights[diagonal] = -weights[diagonal]
            weights.mul_(grad_loss)
            grad_scale += torch.dot(weights.view(-1), dots.view(-1))
            grad_bias += weights.sum()
            weights.mul_(scale)
            grad_rows[r0:r1].addmm_(weights, cols[c0:c1])
            grad_cols[c0:c1].addmm_(weights.T, rows[r0:r1])
    return grad_scale, grad_bias


class _RingSigmoidLoss(torch.autograd.Function):
    """(image (B, D), text (B, D), scale (), bias ()) -> 0-dim sum over our images i and ALL
    ranks' texts j of -log sigmoid(z_ij * (scale * image_i . text_j + bias)). One ring pass:
    texts travel, our images are the rows. All ranks call it together with the same B."""

    @staticmethod
    def forward(ctx, image, text, scale, bias, tile):
        with no_autocast(image):
            dtype = compute_dtype(image)
            rows_image, rows_text = image.to(dtype), text.to(dtype)
            s, b = scale.detach().to(dtype), bias.detach().to(dtype)
            tiles = Tiles(tile, image.shape[0], dtype, image.device)
            texts = RingPass(text.detach())
            total = _block_sigmoid_loss(rows_image, rows_text, s, b, True, tiles)
            for held in texts:
                total += _block_sigmoid_loss(rows_image, held.to(dtype), s, b, False, tiles)
        ctx.tile = tile
        ctx.save_for_backward(image, text, scale, bias)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        image, text, scale, bias = ctx.saved_tensors
        with no_autocast(image):
            dtype = compute_dtype(image)
            rows_image, rows_text = image.to(dtype), text.to(dtype)
            s, b, g = scale.detach().to(dtype), bias.detach().to(dtype), grad_total.to(dtype)
            tiles = Tiles(ctx.tile, image.shape[0], dtype, image.device)
            grad_image, grad_text = torch.zeros_like(rows_image), torch.zeros_like(rows_text)
            texts = RingPass(text.detach())
            grad_scale, grad_bias = _block_sigmoid_loss_backward(
                rows_image, rows_text, s, b, g, True, grad_image, grad_text, tiles
            )
            relay = GradientRelay()
            for held in texts:
                held_grad = torch.zeros_like(rows_text)
                d_scale, d_bias = _block_sigmoid_loss_backward(
                    rows_image, held.to(dtype), s, b, g, False, grad_image, held_grad, tiles
                )
                grad_scale += d_scale
                grad_bias += d_bias
                relay.add(held_grad)
            if (others := relay.others()) is not None:
                grad_text += others
        return (
            grad_image.to(image.dtype),
            grad_text.to(text.dtype),
            grad_scale.to(scale.dtype).reshape(scale.shape),
            grad_bias.to(bias.dtype).reshape(bias.shape),
            None,
        )



class TiledSigLipLoss(TiledLoss):
    """SigLipLoss (same value and gradients, same distributed contract) in O(B_local * D +
    tile^2) memory per rank. The loss is a sum of independent per-pair terms, so each tile's
    contribution is final as soon as it is computed; backward recomputes the tile."""

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        require_logit_bias(logit_bias)
        with no_autocast(image_features):
            total = _RingSigmoidLoss.apply(
                image_features, text_features, logit_scale, logit_bias, self.tile_size
            )
            # divided by the LOCAL batch, as in SigLipLoss: the mean over ranks then divides by
            # the global one
            return total / image_features.shape[0]

