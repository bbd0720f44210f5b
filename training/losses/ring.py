"""What the tiled losses (tiled_clip.py: CLIP, tiled_siglip.py: SigLIP) share: features
and gradients passed round a ring of ranks, tile scratch buffers, and the tile_size option.
See tiled_clip.py for the method (Inf-CL, arXiv 2410.17243)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from training.parallel.collectives import world_info

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


class RingPass:
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


class GradientRelay:
    """Gradients of the features a RingPass hands out, passed along behind them.

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


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    # fp32 for fp32/bf16/fp16 features, fp64 stays fp64 (gradcheck).
    return torch.promote_types(x.dtype, torch.float32)


class Tiles:
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


def tile_dots(rows: torch.Tensor, cols: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.mm(rows, cols.T, out=out)


def no_autocast(x: torch.Tensor):
    # Tiles must not be multiplied in bf16 under the trainer's autocast: the softmax needs the
    # small logit differences that bf16 rounds away.
    return torch.autocast(device_type=x.device.type, enabled=False)


class TiledLoss(nn.Module):
    """Base of the tiled losses: a (tile, tile) tile is the largest logits block ever held."""

    def __init__(self, tile_size: int = DEFAULT_TILE_SIZE) -> None:
        super().__init__()
        if tile_size < 1:
            raise ValueError(f"tile_size must be >= 1, got {tile_size}")
        self.tile_size = tile_size
