"""Memory-linear CLIP and SigLIP losses: the logits are computed tile by tile, never as a matrix.

The gathered losses in contrastive.py build a (B_local, B_global) logits matrix per rank, several
copies of it once autograd has saved what it needs, so memory grows with the square of the batch.
Here, following Inf-CL (Cheng et al. 2024, "Breaking the Memory Barrier: Near Infinite Batch Size
Scaling for Contrastive Loss", arXiv 2410.17243):

  * Features travel round a ring of ranks instead of being all-gathered: at step k = 1..W-1 rank
    r holds the texts (then, in a second pass, the images) of rank (r - k) mod W, scores its own
    rows against them and passes them on. A rank holds at most two other ranks' (B_local, D)
    features at a time, so its memory does not grow with the number of ranks (an all-gather
    holds B_global * D, and its gradient as much again).
  * Each (B_local, B_local) block is cut into (tile, tile) tiles. Forward keeps only a running
    log-sum-exp per row (CLIP) or a running sum (SigLIP); the tiles are thrown away.
  * Backward recomputes each tile from the saved features and per-row log-sum-exps, turns it
    into dloss/dlogits, and multiplies it into the feature gradients. The gradient of the
    features a rank holds travels round the ring behind them, each rank adding its share, and
    reaches the rank that owns them one hop after the last step.

Values and gradients equal those of ClipLoss / SigLipLoss up to summation order: each rank
still returns the loss of ITS rows, normalised by its local batch, and each rank's feature
gradient is the sum over all ranks' losses, the contract of gather_features_with_grad (see
contrastive.py), so DDP and logging work unchanged. Tiles are computed in fp32 (at least) whatever the
feature dtype; features travel in their own dtype, gradients in fp32. tests/test_tiled_loss.py
checks it against the naive losses on 1, 2 and 4 gloo processes; bench/loss_memory.py measures
memory and time. This module holds the CLIP loss; tiled_siglip.py the SigLIP one;
ring.py what both use.

Work, in (B_local, B_local, D) matrix products: naive CLIP 3 per block and direction; tiled
1 forward + 3 backward (the recomputation), except a rank's own block, whose tiles serve both
directions at once: 4 + 8 (W - 1) against 6 W, i.e. 0.67x on one process, 1.17x on four.
SigLIP: 4 against 3 per block.
"""


from __future__ import annotations

import torch

from training.losses.ring import (
    DEFAULT_TILE_SIZE,
    GradientRelay,
    RingPass,
    TiledLoss,
    Tiles,
    compute_dtype,
    no_autocast,
    tile_dots,
)

__all__ = ["DEFAULT_TILE_SIZE", "TiledClipLoss"]


# -- one block of rows against one block of columns, tile by tile -----------------------------


def _logsumexp(x: torch.Tensor, dim: int, work: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp(x, dim), computed in `work` (x's shape) instead of new tiles."""
    top = x.amax(dim=dim, keepdim=True)  # shift by the max so exp cannot overflow
    return torch.sub(x, top, out=work).exp_().sum(dim=dim).log_().add_(top.squeeze(dim))


def _online_logsumexp(running: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    # combining partial log-sum-exps needs nothing but the partial results
    return part if running is None else torch.logaddexp(running, part)


def _block_logsumexp(
    rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, tiles: Tiles
) -> torch.Tensor:
    """logsumexp_j(scale * rows_i . cols_j) for each row i: (R,). rows, cols: compute dtype."""
    out = torch.empty(rows.shape[0], dtype=rows.dtype, device=rows.device)
    for r0, r1 in tiles.spans(rows.shape[0]):
        running = None
        for c0, c1 in tiles.spans(cols.shape[0]):
            logits, work, _ = tiles.scratch(r1 - r0, c1 - c0)
            tile_dots(rows[r0:r1], cols[c0:c1], logits).mul_(scale)
            running = _online_logsumexp(running, _logsumexp(logits, 1, work))
        out[r0:r1] = running
    return out


def _block_logsumexp_backward(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    grad_rows: torch.Tensor,
    grad_cols: torch.Tensor,
    tiles: Tiles,
) -> torch.Tensor:
    """Backward of sum_i grad_lse_i * lse_i, where lse_i = log sum_j exp(scale * rows_i . cols_j).

    With P the softmax over j, G_ij = dloss/dlogits_ij = grad_lse_i * P_ij. Adds scale * G @ cols
    to grad_rows and scale * G^T @ rows to grad_cols; returns dloss/dscale = sum_ij G_ij *
    rows_i . cols_j.
    """
    grad_scale = torch.zeros((), dtype=rows.dtype, device=rows.device)
    for r0, r1 in tiles.spans(rows.shape[0]):
        row_lse, row_grad = lse[r0:r1, None], grad_lse[r0:r1, None]
        for c0, c1 in tiles.spans(cols.shape[0]):
            dots, weights, _ = tiles.scratch(r1 - r0, c1 - c0)
            tile_dots(rows[r0:r1], cols[c0:c1], dots)
            # exp(logit - lse) is the softmax, recomputed exactly from the saved LSE
            torch.mul(dots, scale, out=weights).sub_(row_lse).exp_().mul_(row_grad)
            grad_scale += torch.dot(weights.view(-1), dots.view(-1))
            weights.mul_(scale)  # dlogits/drows = scale * cols
            grad_rows[r0:r1].addmm_(weights, cols[c0:c1])
            grad_cols[c0:c1].addmm_(weights.T, rows[r0:r1])
    return grad_scale


# A rank's own block (its images against its own texts) serves both directions: the text->image
# logits are the transpose of the image->text ones. Computing each tile once and reducing it
# along both axes halves that block's work; on one process it is the whole loss.


def _own_block_logsumexp(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, tiles: Tiles
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp over our texts for each image, over our images for each text), both (B,)."""
    per_image = torch.empty(image.shape[0], dtype=image.dtype, device=image.device)
    per_text: list[torch.Tensor | None] = [None] * len(tiles.spans(text.shape[0]))
    for r0, r1 in tiles.spans(image.shape[0]):
        running = None
        for index, (c0, c1) in enumerate(tiles.spans(text.shape[0])):
            logits, work, _ = tiles.scratch(r1 - r0, c1 - c0)
            tile_dots(image[r0:r1], text[c0:c1], logits).mul_(scale)
            running = _online_logsumexp(running, _logsumexp(logits, 1, work))
            per_text[index] = _online_logsumexp(per_text[index], _logsumexp(logits, 0, work))
        per_image[r0:r1] = running
    return per_image, torch.cat(per_text)


def _own_block_logsumexp_backward(
    image: torch.Tensor,
    text: torch.Tensor,
    scale: torch.Tensor,
    lse: tuple[torch.Tensor, torch.Tensor],
    grad_lse: tuple[torch.Tensor, torch.Tensor],
    grad_image: torch.Tensor,
    grad_text: torch.Tensor,
    tiles: Tiles,
) -> torch.Tensor:
    """Backward of _own_block_logsumexp: both directions' dloss/dlogits summed into one tile
    (image rows, text columns), W = G_image + G_text^T; adds scale * W @ text to grad_image and
    scale * W^T @ image to grad_text, returns dloss/dscale."""
    (lse_image, lse_text), (grad_lse_image, grad_lse_text) = lse, grad_lse
    grad_scale = torch.zeros((), dtype=image.dtype, device=image.device)
    for r0, r1 in tiles.spans(image.shape[0]):
        for c0, c1 in tiles.spans(text.shape[0]):
            dots, weights, text_weights = tiles.scratch(r1 - r0, c1 - c0)
            tile_dots(image[r0:r1], text[c0:c1], dots)
            torch.mul(dots, scale, out=weights).sub_(lse_image[r0:r1, None])
            weights.exp_().mul_(grad_lse_image[r0:r1, None])
            torch.mul(dots, scale, out=text_weights).sub_(lse_text[None, c0:c1])
            weights.add_(text_weights.exp_().mul_(grad_lse_text[None, c0:c1]))
            grad_scale += torch.dot(weights.view(-1), dots.view(-1))
            weights.mul_(scale)
            grad_image[r0:r1].addmm_(weights, text[c0:c1])
            grad_text[c0:c1].addmm_(weights.T, image[r0:r1])
    return grad_scale


# -- the ring loss as an autograd Function ------------------------------------------------------


class _RingClipCrossEntropy(torch.autograd.Function):
    """(image (B, D), text (B, D), scale ()) -> (per_image (B,), per_text (B,)), the
    cross-entropies of each of our images against ALL ranks' texts (target: its own text) and of
    each of our texts against all images: logsumexp_j(s * image_i . text_j) - s * image_i . text_i.
    All ranks call it together with the same B.

    Two ring passes: texts travel (our images are the rows), then images (our texts are the
    rows); only one kind is in flight at a time, which halves the buffers. The target term is
    in here rather than in plain autograd outside so that its gradient (-s * text_i) and the
    softmax's (+s * P_ii * text_i + ...), which nearly cancel for a well-trained model, are
    summed in fp32 and rounded to the features' dtype once, as in ClipLoss."""

    @staticmethod
    def forward(ctx, image, text, scale, tile):
        with no_autocast(image):
            dtype = compute_dtype(image)
            rows_image, rows_text = image.to(dtype), text.to(dtype)
            s = scale.detach().to(dtype)
            tiles = Tiles(tile, image.shape[0], dtype, image.device)
            texts = RingPass(text.detach())  # starts sending while we score our own block
            lse_image, lse_text = _own_block_logsumexp(rows_image, rows_text, s, tiles)
            for held in texts:
                part = _block_logsumexp(rows_image, held.to(dtype), s, tiles)
                lse_image = torch.logaddexp(lse_image, part)
            for held in RingPass(image.detach()):
                part = _block_logsumexp(rows_text, held.to(dtype), s, tiles)
                lse_text = torch.logaddexp(lse_text, part)
            # the matching pair's logit: the same in both directions, and local
            matching = s * (rows_image * rows_text).sum(-1)
        ctx.tile = tile
        ctx.save_for_backward(image, text, scale, lse_image, lse_text)
        return lse_image - matching, lse_text - matching

    @staticmethod
    def backward(ctx, grad_per_image, grad_per_text):
        image, text, scale, lse_image, lse_text = ctx.saved_tensors
        with no_autocast(image):
            dtype = compute_dtype(image)
            rows_image, rows_text = image.to(dtype), text.to(dtype)
            s = scale.detach().to(dtype)
            tiles = Tiles(ctx.tile, image.shape[0], dtype, image.device)
            grad_per_image, grad_per_text = grad_per_image.to(dtype), grad_per_text.to(dtype)
            # the target terms, d(-s * image_i . text_i), from both directions
            target_grad = (grad_per_image + grad_per_text)[:, None]
            grad_image = -s * target_grad * rows_text
            grad_text = -s * target_grad * rows_image
            grad_scale = -torch.dot(target_grad.view(-1), (rows_image * rows_text).sum(-1))

            texts = RingPass(text.detach())
            # our own block holds both roles of our features, rows and columns: its whole
            # gradient is ours and stays here
            grad_scale += _own_block_logsumexp_backward(
                rows_image, rows_text, s, (lse_image, lse_text), (grad_per_image, grad_per_text),
                grad_image, grad_text, tiles,
            )  # fmt: skip
            relay = GradientRelay()
            for held in texts:
                held_grad = torch.zeros_like(rows_text)
                grad_scale += _block_logsumexp_backward(
                    rows_image, held.to(dtype), s, lse_image, grad_per_image,
                    grad_image, held_grad, tiles,
                )  # fmt: skip
                relay.add(held_grad)
            if (others := relay.others()) is not None:
                grad_text += others

            relay = GradientRelay()
            for held in RingPass(image.detach()):
                held_grad = torch.zeros_like(rows_image)
                grad_scale += _block_logsumexp_backward(
                    rows_text, held.to(dtype), s, lse_text, grad_per_text,
                    grad_text, held_grad, tiles,
                )  # fmt: skip
                relay.add(held_grad)
            if (others := relay.others()) is not None:
                grad_image += others
        return (
            grad_image.to(image.dtype),
            grad_text.to(text.dtype),
            grad_scale.to(scale.dtype).reshape(scale.shape),
            None,
        )


# -- the loss ------------------------------------------------------------------------------------


class TiledClipLoss(TiledLoss):
    """ClipLoss (same value and gradients, same distributed contract) in O(B_local * D + tile^2)
    memory per rank instead of O(B_local * B_global)."""

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        with no_autocast(image_features):
            per_image, per_text = _RingClipCrossEntropy.apply(
                image_features, text_features, logit_scale, self.tile_size
            )
            loss = (per_image.mean() + per_text.mean()) / 2
            if logit_bias is not None:
                # A constant shift cancels in cross-entropy (ClipLoss adds it and gets gradient
                # ~0); times 0 it stays in the graph so DDP does not flag it as unused.
                loss = loss + 0.0 * logit_bias.to(loss.dtype)
            return loss


