"""Near-duplicate images by 64-bit perceptual hash (imagehash's phash), for dedup and
decontamination; the embedding twin is `embedding_duplicates`.

Both modules serve two jobs:
  dedup          `duplicates_by_*(pool)`: within one pool, given in priority order (earlier = the
                 copy to keep). Returns, per item, -1 if kept, else the index of the kept item it
                 duplicates.
  decontaminate  `matches_by_*(pool, reference)`: which pool items lie near any item of a
                 reference set (eval images). Returns, per pool item, a reference index or -1.

The greedy rule, shared by both `duplicates_by_*`: walk the items in order; item i is a duplicate
iff it is near an earlier item that was *kept*. Being near a removed item does not count, so no
chain A~B~C removes C through B when C is far from A. Its target is the closest such kept item
(ties -> lowest index). Everything is deterministic: no randomness but a fixed-seed sample.

Hashes: cheap (no model), catch re-encodes, resizes and small crops; blind to semantic copies.
Embeddings: catch more (recolours, larger crops), cost a model pass; thresholds are per model.
"""

from __future__ import annotations

from typing import Iterable

import imagehash
import numpy as np
from PIL import Image

MAX_RADIUS = 16  # 17 bands of 3-4 bits: beyond this, band buckets hold most of the pool
HASH_BATCH = 4096


def perceptual_hash(image: Image.Image) -> int:
    """imagehash.phash (8x8 DCT signs, 64 bits), row-major, first bit most significant."""
    bits = imagehash.phash(image, hash_size=8).hash.ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def perceptual_hashes(images: Iterable[Image.Image]) -> np.ndarray:
    """uint64 [N]: perceptual_hash of each image."""
    return np.array([perceptual_hash(image) for image in images], dtype=np.uint64)


if hasattr(np, "bitwise_count"):  # numpy >= 2.0

    def _popcount(x: np.ndarray) -> np.ndarray:
        return np.bitwise_count(x)

else:
    _BYTE_POPCOUNT = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)

    def _popcount(x: np.ndarray) -> np.ndarray:
        return _BYTE_POPCOUNT[x.view(np.uint8)].reshape(*x.shape, 8).sum(-1, dtype=np.uint8)


def _band_layout(radius: int) -> list[tuple[int, int]]:
    """(shift, width) of radius+1 bands tiling the 64 bits, widths as equal as possible.

    Pigeonhole: r differing bits cannot touch all r+1 bands, so two hashes within radius r agree
    exactly on at least one band. Candidates are then the items sharing a band value."""
    n_bands = radius + 1
    base, extra = divmod(64, n_bands)
    widths = [base + (b < extra) for b in range(n_bands)]
    return [(sum(widths[:b]), w) for b, w in enumerate(widths)]


def _band_keys(hashes: np.ndarray, layout: list[tuple[int, int]]) -> np.ndarray:
    """uint64 [bands, N]: the value of each band of each hash."""
    keys = np.empty((len(layout), len(hashes)), dtype=np.uint64)
    for b, (shift, width) in enumerate(layout):
        keys[b] = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
    return keys


class _BandIndex:
    """Items grouped by band value: per band, sorted keys and the item behind each key.

    Stored as a few sorted runs, merged like a binary counter, so adding items block by block
    copies each item O(log N) times instead of once per block (np.insert into one big array)."""

    def __init__(self, n_bands: int) -> None:
        self.n_bands = n_bands
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # (keys [bands, m], items [bands, m])

    def add(self, keys: np.ndarray, items: np.ndarray) -> None:
        if items.size == 0:
            return
        run_keys, run_items = keys, np.broadcast_to(items, keys.shape)
        while self.runs and self.runs[-1][0].shape[1] <= 2 * run_keys.shape[1]:
            old_keys, old_items = self.runs.pop()
            run_keys = np.concatenate([old_keys, run_keys], axis=1)
            run_items = np.concatenate([old_items, run_items], axis=1)
        order = np.argsort(run_keys, axis=1, kind="stable")
        self.runs.append(
            (np.take_along_axis(run_keys, order, 1), np.take_along_axis(run_items, order, 1))
        )

    def candidates(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query position, item) for every item sharing a band value with a query; a pair may
        repeat (several shared bands), which is harmless downstream."""
        queries, items = [], []
        for run_keys, run_items in self.runs:
            for b in range(self.n_bands):
                lo = np.searchsorted(run_keys[b], keys[b], side="left")
                hi = np.searchsorted(run_keys[b], keys[b], side="right")
                counts = hi - lo
                starts = np.repeat(lo - (np.cumsum(counts) - counts), counts)
                queries.append(np.repeat(np.arange(len(counts)), counts))
                items.append(run_items[b][starts + np.arange(int(counts.sum()))])
        if not queries:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        return np.concatenate(queries), np.concatenate(items)


def _near_pairs(
    index: _BandIndex, keys: np.ndarray, query_hashes: np.ndarray, item_hashes: np.ndarray, r: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query position, item, Hamming distance) of the candidates truly within radius."""
    queries, items = index.candidates(keys)
    distances = _popcount(query_hashes[queries] ^ item_hashes[items])
    near = distances <= r
    return queries[near], items[near], distances[near].astype(np.int64)


def _closest(
    queries: np.ndarray, items: np.ndarray, distances: np.ndarray, n_queries: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per query: the item at the smallest distance, ties -> lowest item (-1, and distance 65
    where there is none)."""
    best_item = np.full(n_queries, -1, np.int64)
    best_distance = np.full(n_queries, 65, np.int64)
    order = np.lexsort((items, distances, queries))
    first_queries, first = np.unique(queries[order], return_index=True)
    best_item[first_queries] = items[order][first]
    best_distance[first_queries] = distances[order][first]
    return best_item, best_distance


def _check_hashes(hashes: np.ndarray, name: str) -> np.ndarray:
    hashes = np.asarray(hashes)
    if hashes.ndim != 1 or not (hashes.dtype == np.uint64 or hashes.size == 0):
        raise ValueError(f"{name} must be a 1-D uint64 array, got {hashes.dtype} {hashes.shape}")
    return hashes.astype(np.uint64, copy=False)


def _check_radius(radius: int) -> None:
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)):
        raise ValueError(f"radius must be an int, got {radius!r}")
    if not 0 <= radius <= MAX_RADIUS:
        raise ValueError(f"radius must be in 0..{MAX_RADIUS} bits, got {radius}")


def duplicates_by_hash(
    hashes: np.ndarray, radius: int, *, batch_size: int = HASH_BATCH
) -> np.ndarray:
    """int64 [N]: -1 for a kept item, else the kept item it duplicates (Hamming <= radius).

    Greedy in the given order: item i is a duplicate iff it lies within `radius` of an earlier
    item that was kept (never through a removed one); its target is the closest such kept item,
    ties -> lowest index.

    Multi-index hashing: only kept items enter the band index, and each item is compared with
    the kept items sharing one of its radius+1 band values, verified by popcount. Cost is
    O(N * (r+1) * c), c the mean kept-bucket size; for evenly spread hashes c ~ K / 2**(64/(r+1))
    (K kept so far), e.g. ~120-240 at K = 1e6, r = 4, but quadratic in the worst case of a pool
    of near-identical distinct hashes sharing band values. A flood of one repeated image costs
    little, since only its first copy is ever kept. Memory is O(N + batch_size * c).
    """
    hashes = _check_hashes(hashes, "hashes")
    _check_radius(radius)
    layout = _band_layout(int(radius))
    keys = _band_keys(hashes, layout)
    kept_index = _BandIndex(len(layout))
    targets = np.full(len(hashes), -1, np.int64)
    for start in range(0, len(hashes), batch_size):
        block = slice(start, min(start + batch_size, len(hashes)))
        block_hashes, block_keys = hashes[block], keys[:, block]
        n = len(block_hashes)
        # 1. Against items kept in earlier blocks: no ordering question left there.
        prior_item, prior_distance = _closest(
            *_near_pairs(kept_index, block_keys, block_hashes, hashes, radius), n
        )
        # 2. Greedy among the block's survivors; only those near an earlier survivor wait on it.
        # A repeat of an earlier hash in the block is never kept (it is as near as that one to
        # whatever removed it), so it leaves now: a flood of one image costs no pairs.
        kept = prior_item < 0
        kept[np.setdiff1d(np.arange(n), np.unique(block_hashes, return_index=True)[1])] = False
        survivors = np.flatnonzero(kept)
        local = _BandIndex(len(layout))
        local.add(block_keys[:, survivors], survivors)
        queries, items, _ = _near_pairs(
            local, block_keys[:, survivors], block_hashes[survivors], block_hashes, radius
        )
        queries = survivors[queries]
        order = np.argsort(queries, kind="stable")
        queries, items = queries[order], items[order]
        earlier = items < queries
        queries, items = queries[earlier], items[earlier]
        dependent, bounds = np.unique(queries, return_index=True)
        bounds = np.append(bounds, len(queries))
        for q, lo, hi in zip(dependent.tolist(), bounds[:-1].tolist(), bounds[1:].tolist()):
            if kept[items[lo:hi]].any():
                kept[q] = False
        # 3. Closest target: a kept item of an earlier block, or one kept earlier in this block.
        new_kept = np.flatnonzero(kept)
        fresh = _BandIndex(len(layout))
        fresh.add(block_keys[:, new_kept], new_kept)
        pairs = _near_pairs(fresh, block_keys, block_hashes, block_hashes, radius)
        earlier = pairs[1] < pairs[0]
        local_item, local_distance = _closest(*(part[earlier] for part in pairs), n)
        use_local = local_distance < prior_distance  # tie -> the earlier block's, lower index
        block_targets = np.where(use_local, start + local_item, prior_item)
        targets[block] = np.where(kept, -1, block_targets)
        kept_index.add(block_keys[:, new_kept], start + new_kept)
    return targets


def matches_by_hash(
    queries: np.ndarray, references: np.ndarray, radius: int, *, batch_size: int = HASH_BATCH
) -> np.ndarray:
    """int64 [Q]: the closest reference within `radius` bits (ties -> lowest index), or -1.

    Same multi-index hashing as duplicates_by_hash with all (distinct) references indexed;
    cost O(Q * (r+1) * c), c the mean bucket size of the distinct references."""
    queries = _check_hashes(queries, "queries")
    references = _check_hashes(references, "references")
    _check_radius(radius)
    layout = _band_layout(int(radius))
    # Repeated references would only add candidates; the first copy has the lowest index.
    distinct, first = np.unique(references, return_index=True)
    reference_index = _BandIndex(len(layout))
    reference_index.add(_band_keys(distinct, layout), first.astype(np.int64))
    matches = np.full(len(queries), -1, np.int64)
    for start in range(0, len(queries), batch_size):
        block = queries[start : start + batch_size]
        pairs = _near_pairs(reference_index, _band_keys(block, layout), block, references, radius)
        matches[start : start + len(block)] = _closest(*pairs, len(block))[0]
    return matches
