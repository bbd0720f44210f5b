"""Every collective the run uses, usable with or without a process group.

The losses' feature gather (with its gradient contract) and the trainer's small per-step sums and
per-rank object gathers. Without an initialised process group (single process, unit tests,
evaluation) every helper is the identity, so callers never branch on world size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from training.parallel.process_group import Distributed


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
    normalised by its local batch (see training/losses/contrastive.py), DDP's average of
    parameter gradients over ranks is then exactly the gradient of the global-batch loss.
    """
    if world_info()[1] == 1:
        return x
    return _GatherWithGrad.apply(x, group)


def sum_over_ranks(values: torch.Tensor, env: Distributed) -> torch.Tensor:
    """Element-wise sum of a small float tensor over all ranks (every rank takes part; shape [k]
    in, [k] out). Used for the step's loss and for flags all ranks must act on together."""
    if env.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_objects(obj, env: Distributed) -> list:
    """Every rank contributes one picklable object; every rank receives the list over ranks."""
    if not env.enabled:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out
