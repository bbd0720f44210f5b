"""Eval sharded across ranks: under torchrun each rank embeds a slice of every dataset and the
features are gathered, so every rank ends with the whole set and the metrics equal a 1-rank run.

    torchrun --nproc_per_node 8 -m eval.run --checkpoint runs/x --suite datacomp --wds-root DIR

A plain `python -m eval.run` is a world of one and nothing here does anything. Slices: a
webdataset source is split by shard (rank r reads shards r, r+W, ...), an indexable dataset by
index; payloads travel with their images, so the order the slices come back in never matters.
Only rank 0 writes results, prints and logs (eval.evaluate).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, IterableDataset, Subset

from training.parallel.collectives import world_info


def is_main() -> bool:
    return world_info()[0] == 0


def rank_slice(dataset: Dataset) -> Dataset:
    """This rank's part of `dataset` (the dataset itself in a world of one)."""
    rank, world = world_info()
    if world == 1:
        return dataset
    if isinstance(dataset, IterableDataset):
        if not hasattr(dataset, "urls"):
            raise TypeError(f"cannot shard {type(dataset).__name__} across ranks (no .urls)")
        part = copy.copy(dataset)
        part.urls = dataset.urls[rank::world]
        return part
    return Subset(dataset, range(rank, len(dataset), world))


def gather_encoded(features: torch.Tensor | None, payloads: list) -> tuple[torch.Tensor | None, list]:
    """All ranks call it once per dataset, in the same order. In: this rank's features [n_r, D]
    (None if its slice was empty) and payloads; out, on every rank: the concatenation over ranks
    in rank order. all_gather_object pickles through the default group (gloo or NCCL): eval
    features are small (N x D fp32) next to what the images cost to decode."""
    rank, world = world_info()
    if world == 1:
        return features, payloads
    parts: list = [None] * world
    dist.all_gather_object(parts, (features, payloads))
    kept = [(f, p) for f, p in parts if f is not None]
    if not kept:
        return None, []
    return torch.cat([f for f, _ in kept]), [x for _, p in kept for x in p]


def barrier() -> None:
    """Every rank waits here (rank 0 has written what the others will read next)."""
    if world_info()[1] > 1:
        dist.barrier()


def agree(value):
    """Rank 0's `value` on every rank (all ranks call it, in the same order): the watcher's
    decisions (which checkpoints, what is pending, when to stop) must be the same everywhere or
    the ranks' collectives would pair up wrongly and hang."""
    if world_info()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
