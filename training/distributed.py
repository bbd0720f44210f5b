"""The few collectives the contrastive losses need, usable with or without a process group.

Without an initialised process group (single process, unit tests, evaluation) every helper is
the identity, so callers never branch on world size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_info() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is absent or not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the gradient of its own rows.

    Forward, all ranks: (B, D) in -> (world * B, D) out, rank r's rows at [r * B, (r + 1) * B).
    Backward, all ranks: every rank's loss may depend on every rank's rows, so the gradient of
    rank r's rows is the SUM over ranks of d(loss_rank)/d(rows_r): all-reduce(sum) the
    (world * B, D) gradient, keep our slice. (A reduce-scatter would move half the bytes but is
    missing on some backends (gloo); features are tiny next to the model's gradients.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.rows = x.shape[0]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # Autograd may hand the same buffer elsewhere: reduce a copy, never its input in place.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows], None


def gather_features_with_grad(
    x: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Concatenate every rank's (B, D) features into (world * B, D), keeping the autograd graph.

    All ranks of `group` must call it, in the same order, with the same B (the trainer drops
    the last partial batch). Gradient contract: after backward, rank r holds
    sum over ranks s of d(loss_s)/d(x_r). With each rank's loss covering its local rows and
    normalised by its local batch (see losses.py), DDP's average of parameter gradients over
    ranks is then exactly the gradient of the global-batch loss.
    """
    if world_info()[1] == 1:
        return x
    return _GatherWithGrad.apply(x, group)


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """Average a tensor over all ranks (no gradient): for logging a per-rank loss as the
    global-batch loss. All ranks take part; shape in == shape out."""
    if world_info()[1] == 1:
        return value.detach()
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()
