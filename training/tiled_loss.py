"""Memory-linear CLIP and SigLIP losses: the logits are computed tile by tile, never as a matrix.

The gathered losses in losses.py build a (B_local, B_global) logits matrix per rank, several
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
losses.py), so DDP and logging work unchanged. Tiles are computed in fp32 (at least) whatever the
feature dtype; features travel in their own dtype, gradients in fp32. tests/test_tiled_loss.py
checks it against the naive losses on 1, 2 and 4 gloo processes; bench/loss_memory.py measures
memory and time.

Work, in (B_local, B_local, D) matrix products: naive CLIP 3 per block and direction; tiled
1 forward + 3 backward (the recomputation), except a rank's own block, whose tiles serve both
directions at once: 4 + 8 (W - 1) against 6 W, i.e. 0.67x on one process, 1.17x on four.
SigLIP: 4 against 3 per block.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from training.distributed import world_info

DEFAULT_TILE_SIZE = 1024

# Features and partial gradients can be in flight between the same two ranks at the same time
# (backward); distinct tags keep each receive matched to its own kind of message.
_FEATURES_TAG = 1
_GRADIENTS_TAG = 2


# -- ring communication ------------------------------------------------------------------------


class _InFlight:
    """A tensor being sent to the next rank while a same-shaped one arrives from the previous.

    All ranks create one together: rank r sends (B, D) to r + 1 and receives (B, D) from r - 1
    (mod world). Shape and dtype in == out on every rank (all ranks have the same B)."""

    def __init__(self, outgoing: torch.Tensor, tag: int) -> None:
        rank, world = world_info()
        self._outgoing = outgoing.contiguous()  # must stay alive until sent
        self._incoming = torch.empty_like(self._outgoing)
        self._works = dist.batch_isend_irecv(
            [
                dist.P2POp(dist.isend, self._outgoing, (rank + 1) % world, tag=tag),
                dist.P2POp(dist.irecv, self._incoming, (rank - 1) % world, tag=tag),
            ]
        )

    def wait(self) -> torch.Tensor:
        for work in self._works:
            work.wait()
        del self._outgoing
        return self._incoming


class _RingPass:
    """Our (B, D) features passed round the ring. Iterating yields, for steps k = 1..W-1, the
    features of rank (r - k), each received while the previous step was being computed; nothing
    on one process. All ranks iterate together. Sending starts at construction, so the caller
    can work on its own block meanwhile."""

    def __init__(self, features: torch.Tensor) -> None:
        self._world = world_info()[1]
        self._arriving = _InFlight(features, _FEATURES_TAG) if self._world > 1 else None

    def __iter__(self):
        for step in range(1, self._world):
            held = self._arriving.wait()
            self._arriving = _InFlight(held, _FEATURES_TAG) if step < self._world - 1 else None
            yield held


class _GradientRelay:
    """Gradients of the features a _RingPass hands out, passed along behind them.

    At each step, `add` our (B, D) fp32 contribution to the gradient of the features we hold;
    it is summed with the earlier ranks' contributions (from r - 1) and sent on to r + 1. After
    the last step, `others` returns every other rank's contribution to OUR features' gradient
    (None on one process). All ranks call add() once per step, then others()."""

    def __init__(self) -> None:
        self._in_flight: _InFlight | None = None

    def add(self, contribution: torch.Tensor) -> None:
        if self._in_flight is not None:
            contribution += self._in_flight.wait()
        self._in_flight = _InFlight(contribution, _GRADIENTS_TAG)

    def others(self) -> torch.Tensor | None:
        return self._in_flight.wait() if self._in_flight is not None else None


# -- one block of rows against one block of columns, tile by tile -----------------------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # fp32 for fp32/bf16/fp16 features, fp64 stays fp64 (gradcheck).
    return torch.promote_types(x.dtype, torch.float32)


class _Tiles:
    """Tile size plus three (tile, tile) scratch buffers that every tile reuses: a loop over
    thousands of tiles then allocates nothing per tile (no allocator churn on the GPU, no page
    faults or fragmented heap on the CPU)."""

    def __init__(self, size: int, block: int, dtype: torch.dtype, device: torch.device) -> None:
        # blocks are (block, block): rows and columns are both some rank's local batch
        self.size = min(size, block)
        self._buffers = [torch.empty(self.size**2, dtype=dtype, device=device) for _ in range(3)]

    def spans(self, n: int) -> list[tuple[int, int]]:
        return [(start, min(start + self.size, n)) for start in range(0, n, self.size)]

    def scratch(self, rows: int, cols: int) -> list[torch.Tensor]:
        # contiguous (rows, cols) views, also for the ragged last tile
        return [b[: rows * cols].view(rows, cols) for b in self._buffers]


def _dots(rows: torch.Tensor, cols: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.mm(rows, cols.T, out=out)


def _logsumexp(x: torch.Tensor, dim: int, work: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp(x, dim), computed in `work` (x's shape) instead of new tiles."""
    top = x.amax(dim=dim, keepdim=True)  # shift by the max so exp cannot overflow
    return torch.sub(x, top, out=work).exp_().sum(dim=dim).log_().add_(top.squeeze(dim))


def _online_logsumexp(running: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    # combining partial log-sum-exps needs nothing but the partial results
    return part if running is None else torch.logaddexp(running, part)


def _block_logsumexp(
    rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, tiles: _Tiles
) -> torch.Tensor:
    """logsumexp_j(scale * rows_i . cols_j) for each row i: (R,). rows, cols: compute dtype."""
    out = torch.empty(rows.shape[0], dtype=rows.dtype, device=rows.device)
    for r0, r1 in tiles.spans(rows.shape[0]):
        running = None
        for c0, c1 in tiles.spans(cols.shape[0]):
            logits, work, _ = tiles.scratch(r1 - r0, c1 - c0)
            _dots(rows[r0:r1], cols[c0:c1], logits).mul_(scale)
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
    tiles: _Tiles,
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
            _dots(rows[r0:r1], cols[c0:c1], dots)
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
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, tiles: _Tiles
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp over our texts for each image, over our images for each text), both (B,)."""
    per_image = torch.empty(image.shape[0], dtype=image.dtype, device=image.device)
    per_text: list[torch.Tensor | None] = [None] * len(tiles.spans(text.shape[0]))
    for r0, r1 in tiles.spans(image.shape[0]):
        running = None
        for index, (c0, c1) in enumerate(tiles.spans(text.shape[0])):
            logits, work, _ = tiles.scratch(r1 - r0, c1 - c0)
            _dots(image[r0:r1], text[c0:c1], logits).mul_(scale)
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
    tiles: _Tiles,
) -> torch.Tensor:
    """Backward of _own_block_logsumexp: both directions' dloss/dlogits summed into one tile
    (image rows, text columns), W = G_image + G_text^T; adds scale * W @ text to grad_image and
    scale * W^T @ image to grad_text, returns dloss/dscale."""
    (lse_image, lse_text), (grad_lse_image, grad_lse_text) = lse, grad_lse
    grad_scale = torch.zeros((), dtype=image.dtype, device=image.device)
    for r0, r1 in tiles.spans(image.shape[0]):
        for c0, c1 in tiles.spans(text.shape[0]):
            dots, weights, text_weights = tiles.scratch(r1 - r0, c1 - c0)
            _dots(image[r0:r1], text[c0:c1], dots)
            torch.mul(dots, scale, out=weights).sub_(lse_image[r0:r1, None])
            weights.exp_().mul_(grad_lse_image[r0:r1, None])
            torch.mul(dots, scale, out=text_weights).sub_(lse_text[None, c0:c1])
            weights.add_(text_weights.exp_().mul_(grad_lse_text[None, c0:c1]))
            grad_scale += torch.dot(weights.view(-1), dots.view(-1))
            weights.mul_(scale)
            grad_image[r0:r1].addmm_(weights, text[c0:c1])
            grad_text[c0:c1].addmm_(weights.T, image[r0:r1])
    return grad_scale


def _signed_logits(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    span: tuple[int, int, int, int],
    own_block: bool,
    tiles: _Tiles,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """(dots, z * logits, diagonal) of one SigLIP tile, in the scratch buffers: z = +1 for
    matching pairs, which are the diagonal of the rank's own block, else -1. `diagonal`: the
    matching pairs' (row, col) indices inside the tile, or None."""
    r0, r1, c0, c1 = span
    dots, signed, _ = tiles.scratch(r1 - r0, c1 - c0)
    _dots(rows[r0:r1], cols[c0:c1], dots)
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
    tiles: _Tiles,
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
    tiles: _Tiles,
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


# -- the ring losses as autograd Functions ------------------------------------------------------


def _no_autocast(x: torch.Tensor):
    # Tiles must not be multiplied in bf16 under the trainer's autocast: the softmax needs the
    # small logit differences that bf16 rounds away.
    return torch.autocast(device_type=x.device.type, enabled=False)


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
        with _no_autocast(image):
            dtype = _compute_dtype(image)
            rows_image, rows_text = image.to(dtype), text.to(dtype)
            s = scale.detach().to(dtype)
            tiles = _Tiles(tile, image.shape[0], dtype, image.device)
            texts = _RingPass(text.detach())  # starts sending while we score our own block
            lse_image, lse_text = _own_block_logsumexp(rows_image, rows_text, s, tiles)
            for held in texts:
                part = _block_logsumexp(rows_image, held.to(dtype), s, tiles)
                lse_image = torch.logaddexp(lse_image, part)
            for held in _RingPass(image.detach()):
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
        with _no_autocast(image):
            dtype = _compute_dtype(image)
            rows_image, rows_text = image.to(dtype), text.to(dtype)
            s = scale.detach().to(dtype)
            tiles = _Tiles(ctx.tile, image.shape[0], dtype, image.device)
            grad_per_image, grad_per_text = grad_per_image.to(dtype), grad_per_text.to(dtype)
            # the target terms, d(-s * image_i . text_i), from both directions
            target_grad = (grad_per_image + grad_per_text)[:, None]
            grad_image = -s * target_grad * rows_text
            grad_text = -s * target_grad * rows_image
            grad_scale = -torch.dot(target_grad.view(-1), (rows_image * rows_text).sum(-1))

            texts = _RingPass(text.detach())
            # our own block holds both roles of our features, rows and columns: its whole
            # gradient is ours and stays here
            grad_scale += _own_block_logsumexp_backward(
                rows_image, rows_text, s, (lse_image, lse_text), (grad_per_image, grad_per_text),
                grad_image, grad_text, tiles,
            )  # fmt: skip
            relay = _GradientRelay()
            for held in texts:
                held_grad = torch.zeros_like(rows_text)
                grad_scale += _block_logsumexp_backward(
                    rows_image, held.to(dtype), s, lse_image, grad_per_image,
                    grad_image, held_grad, tiles,
                )  # fmt: skip
                relay.add(held_grad)
            if (others := relay.others()) is not None:
                grad_text += others

            relay = _GradientRelay()
            for held in _RingPass(image.detach()):
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


class _RingSigmoidLoss(torch.autograd.Function):
    """(image (B, D), text (B, D), scale (), bias ()) -> 0-dim sum over our images i and ALL
    ranks' texts j of -log sigmoid(z_ij * (scale * image_i . text_j + bias)). One ring pass:
    texts travel, our images are the rows. All ranks call it together with the same B."""

    @staticmethod
    def forward(ctx, image, text, scale, bias, tile):
        with _no_autocast(image):
            dtype = _compute_dtype(image)
            rows_image, rows_text = image.to(dtype), text.to(dtype)
            s, b = scale.detach().to(dtype), bias.detach().to(dtype)
            tiles = _Tiles(tile, image.shape[0], dtype, image.device)
            texts = _RingPass(text.detach())
            total = _block_sigmoid_loss(rows_image, rows_text, s, b, True, tiles)
            for held in texts:
                total += _block_sigmoid_loss(rows_image, held.to(dtype), s, b, False, tiles)
        ctx.tile = tile
        ctx.save_for_backward(image, text, scale, bias)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        image, text, scale, bias = ctx.saved_tensors
        with _no_autocast(image):
            dtype = _compute_dtype(image)
            rows_image, rows_text = image.to(dtype), text.to(dtype)
            s, b, g = scale.detach().to(dtype), bias.detach().to(dtype), grad_total.to(dtype)
            tiles = _Tiles(ctx.tile, image.shape[0], dtype, image.device)
            grad_image, grad_text = torch.zeros_like(rows_image), torch.zeros_like(rows_text)
            texts = _RingPass(text.detach())
            grad_scale, grad_bias = _block_sigmoid_loss_backward(
                rows_image, rows_text, s, b, g, True, grad_image, grad_text, tiles
            )
            relay = _GradientRelay()
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


# -- the losses ---------------------------------------------------------------------------------


class TiledClipLoss(nn.Module):
    """ClipLoss (same value and gradients, same distributed contract) in O(B_local * D + tile^2)
    memory per rank instead of O(B_local * B_global)."""

    def __init__(self, tile_size: int = DEFAULT_TILE_SIZE) -> None:
        super().__init__()
        if tile_size < 1:
            raise ValueError(f"tile_size must be >= 1, got {tile_size}")
        self.tile_size = tile_size

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        with _no_autocast(image_features):
            per_image, per_text = _RingClipCrossEntropy.apply(
                image_features, text_features, logit_scale, self.tile_size
            )
            loss = (per_image.mean() + per_text.mean()) / 2
            if logit_bias is not None:
                # A constant shift cancels in cross-entropy (ClipLoss adds it and gets gradient
                # ~0); times 0 it stays in the graph so DDP does not flag it as unused.
                loss = loss + 0.0 * logit_bias.to(loss.dtype)
            return loss


class TiledSigLipLoss(nn.Module):
    """SigLipLoss (same value and gradients, same distributed contract) in O(B_local * D +
    tile^2) memory per rank. The loss is a sum of independent per-pair terms, so each tile's
    contribution is final as soon as it is computed; backward recomputes the tile."""

    def __init__(self, tile_size: int = DEFAULT_TILE_SIZE) -> None:
        super().__init__()
        if tile_size < 1:
            raise ValueError(f"tile_size must be >= 1, got {tile_size}")
        self.tile_size = tile_size

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if logit_bias is None:
            raise ValueError("SigLipLoss needs a logit bias: build the model with for_siglip(cfg)")
        with _no_autocast(image_features):
            total = _RingSigmoidLoss.apply(
                image_features, text_features, logit_scale, logit_bias, self.tile_size
            )
            # divided by the LOCAL batch, as in SigLipLoss: the mean over ranks then divides by
            # the global one
            return total / image_features.shape[0]
