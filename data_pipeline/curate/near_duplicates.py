"""Near-duplicate images, found two ways: 64-bit perceptual hashes, or CLIP-style embeddings.

Both serve two jobs:
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

import math
import os
import sys
from dataclasses import dataclass
from typing import Iterable

import imagehash
import numpy as np
from PIL import Image

MAX_RADIUS = 16  # 17 bands of 3-4 bits: beyond this, band buckets hold most of the pool
HASH_BATCH = 4096
EMBEDDING_BATCH = 2048
INDEX_KINDS = ("auto", "flat", "ivfpq")
NORM_TOLERANCE = 1e-3  # fp16 round trips of unit vectors stay well inside this
IVFPQ_SEED = 0
IVFPQ_NBITS = 8
# faiss warns below 39 training points per centroid; a PQ with 8 bits has 256 per sub-quantizer.
MIN_POINTS_PER_CENTROID = 39
IVFPQ_MIN_VECTORS = MIN_POINTS_PER_CENTROID * 2**IVFPQ_NBITS


# ---------------------------------------------------------------- perceptual hashes


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


# ---------------------------------------------------------------- embeddings


@dataclass(frozen=True)
class EmbeddingIndexChoice:
    """Which faiss index a search used, with why, for the curation report.

    IVF-PQ parameters are 0 for the flat index. `train_size` vectors, drawn without replacement
    with numpy seed `seed`, train the IVF centroids and the product quantizer."""

    kind: str
    reason: str
    nlist: int = 0
    m: int = 0
    nbits: int = 0
    nprobe: int = 0
    train_size: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("flat", "ivfpq"):
            raise ValueError(f"kind must be 'flat' or 'ivfpq', got {self.kind!r}")
        if not self.reason:
            raise ValueError("reason must say why this index was chosen")
        params = (self.nlist, self.m, self.nbits, self.nprobe, self.train_size)
        if self.kind == "ivfpq" and min(params) < 1:
            raise ValueError(f"ivfpq needs positive nlist, m, nbits, nprobe, train_size: {self}")
        if self.kind == "flat" and any(params):
            raise ValueError(f"flat takes no IVF-PQ parameters: {self}")


def _subquantizers(dim: int) -> int:
    """m, a divisor of dim giving sub-vectors of 8..16 dims (the smallest such: most accurate);
    failing that, the divisor whose sub-vector size is nearest to that range."""
    divisors = [m for m in range(1, dim + 1) if dim % m == 0]
    in_range = [m for m in divisors if 8 <= dim // m <= 16]
    if in_range:
        return max(in_range)
    return min(divisors, key=lambda m: (max(8 - dim // m, dim // m - 16), -m))


def _ivfpq_choice(n: int, dim: int, why: str) -> EmbeddingIndexChoice:
    # Sizes follow faiss's wiki page "Guidelines to choose an index": for up to ~1M vectors it
    # suggests IVF with 4*sqrt(N) to 16*sqrt(N) lists, trained on 30 to 256 vectors per list; we
    # take the low end of both (fewer lists and less training on a CPU) and cap the lists so each
    # centroid still sees faiss's minimum of 39 training points. PQ with 8-16 dims per 8-bit
    # sub-quantizer is the usual memory/accuracy middle; nprobe 16 is a common starting point.
    if n < IVFPQ_MIN_VECTORS:
        raise ValueError(
            f"ivfpq needs at least {IVFPQ_MIN_VECTORS:,} vectors to train its 256-centroid "
            f"product quantizer, got {n:,}; use index='flat'"
        )
    nlist = max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_CENTROID))
    m = _subquantizers(dim)
    nprobe = min(16, nlist)
    train_size = min(n, max(64 * nlist, IVFPQ_MIN_VECTORS))
    reason = (
        f"{why}: approximate IndexIVFPQ with nlist={nlist} (~4*sqrt(n), capped at n/39), "
        f"m={m} sub-quantizers of {dim // m} dims x {IVFPQ_NBITS} bits, nprobe={nprobe}, trained "
        f"on {train_size:,} vectors sampled with seed {IVFPQ_SEED}; every candidate it returns is "
        f"re-scored exactly, so it can miss duplicates but never invent one"
    )
    params = (nlist, m, IVFPQ_NBITS, nprobe, train_size, IVFPQ_SEED)
    return EmbeddingIndexChoice("ivfpq", reason, *params)


def choose_index(n: int, dim: int, flat_limit: int = 2_000_000) -> EmbeddingIndexChoice:
    """Exact IndexFlatIP for n <= flat_limit (or too few vectors to train IVF-PQ), else IVF-PQ."""
    if n < 0 or dim < 1 or flat_limit < 0:
        raise ValueError(f"need n >= 0, dim >= 1, flat_limit >= 0; got {n}, {dim}, {flat_limit}")
    if n <= flat_limit:
        reason = (
            f"{n:,} vectors <= flat_limit {flat_limit:,}: exact brute-force IndexFlatIP, "
            f"no training, no recall loss"
        )
        return EmbeddingIndexChoice("flat", reason)
    if n < IVFPQ_MIN_VECTORS:
        reason = (
            f"{n:,} vectors > flat_limit {flat_limit:,} but fewer than the {IVFPQ_MIN_VECTORS:,} "
            f"IVF-PQ needs to train: exact brute-force IndexFlatIP"
        )
        return EmbeddingIndexChoice("flat", reason)
    return _ivfpq_choice(n, dim, f"{n:,} vectors > flat_limit {flat_limit:,}")


def _resolve_choice(index: str, n: int, dim: int, flat_limit: int) -> EmbeddingIndexChoice:
    if index not in INDEX_KINDS:
        raise ValueError(f"index must be one of {INDEX_KINDS}, got {index!r}")
    if index == "auto":
        return choose_index(n, dim, flat_limit)
    if index == "flat":
        return EmbeddingIndexChoice("flat", f"index='flat' requested: exact search, {n:,} vectors")
    return _ivfpq_choice(n, dim, f"index='ivfpq' requested for {n:,} vectors")


def _faiss_threads() -> int:
    """Threads for faiss: OMP_NUM_THREADS if set, else torch's setting if torch is loaded, else
    the CPUs this process may run on. faiss's own default counts the machine's cores, which
    oversubscribes a container or Slurm allocation that grants fewer."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    if "torch" in sys.modules:
        return max(1, sys.modules["torch"].get_num_threads())
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


def _build_index(choice: EmbeddingIndexChoice, dim: int, training: np.ndarray):  # -> faiss.Index
    import faiss  # only the embedding half needs faiss; hash users need not install it

    faiss.omp_set_num_threads(_faiss_threads())
    if choice.kind == "flat":
        return faiss.IndexFlatIP(dim)
    index = faiss.index_factory(
        dim, f"IVF{choice.nlist},PQ{choice.m}x{choice.nbits}", faiss.METRIC_INNER_PRODUCT
    )
    # Polysemous training reorders PQ codes for Hamming pre-filtering, which we never use; it is
    # on by default and takes ~20x longer than the PQ training itself.
    index.do_polysemous_training = False  # index_factory returns the IndexIVFPQ itself
    rng = np.random.default_rng(choice.seed)
    sample = np.sort(rng.choice(len(training), size=choice.train_size, replace=False))
    index.train(np.ascontiguousarray(training[sample]))
    index.nprobe = choice.nprobe
    return index


def _check_features(features: np.ndarray, name: str) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 2 or not np.issubdtype(features.dtype, np.floating):
        raise ValueError(f"{name} must be float [N, D], got {features.dtype} {features.shape}")
    features = np.ascontiguousarray(features, dtype=np.float32)
    if len(features):
        norms = np.linalg.norm(features, axis=1)
        worst = int(np.argmax(np.abs(norms - 1)))
        if not abs(norms[worst] - 1) <= NORM_TOLERANCE:  # also catches NaN
            raise ValueError(f"{name} must be L2-normalised: row {worst} has norm {norms[worst]}")
    return features


def _check_search_args(threshold: float, k: int, batch_size: int) -> None:
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold is a cosine similarity in (0, 1], got {threshold}")
    if k < 1 or batch_size < 1:
        raise ValueError(f"k and batch_size must be >= 1, got {k}, {batch_size}")


def _best_exact(
    index, row_items: np.ndarray, stored: np.ndarray, queries: np.ndarray, k: int,
    threshold: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Per query: the stored item with the highest exact cosine >= threshold among the index's k
    nearest (ties -> lowest item), and that cosine; -1 and -inf where none.

    The index only proposes candidates; the decision uses dot products of the stored float32
    vectors, so IVF-PQ's approximate distances can lose a duplicate but not invent one."""
    best_item = np.full(len(queries), -1, np.int64)
    best_sim = np.full(len(queries), -np.inf, np.float32)
    if index.ntotal == 0:
        return best_item, best_sim
    _, rows = index.search(queries, min(k, index.ntotal))
    found = rows >= 0  # IVF returns -1 when the probed lists hold fewer than k vectors
    items = np.where(found, row_items[np.where(found, rows, 0)], -1)
    sims = np.full(rows.shape, -np.inf, np.float32)
    for c in range(rows.shape[1]):  # column by column keeps memory at one [batch, D] gather
        sims[:, c] = np.einsum("bd,bd->b", queries, stored[np.maximum(items[:, c], 0)])
    sims[~found | (sims < threshold)] = -np.inf
    top = sims.max(axis=1)
    has = top > -np.inf
    lowest = np.where(sims == top[:, None], items, np.iinfo(np.int64).max).min(axis=1)
    best_item[has], best_sim[has] = lowest[has], top[has]
    return best_item, best_sim


def duplicates_by_embedding(
    features: np.ndarray, threshold: float, index: str = "auto", k: int = 16,
    flat_limit: int = 2_000_000, *, batch_size: int = EMBEDDING_BATCH,
) -> tuple[np.ndarray, EmbeddingIndexChoice]:
    """(int64 [N]: -1 for kept, else the kept item it duplicates; the index used).

    features: float32 [N, D], L2-normalised, in priority order. Duplicate = cosine >= threshold
    with an earlier *kept* item (greedy, as in duplicates_by_hash; target = most similar such
    item, ties -> lowest index). Only kept items enter the faiss index, so the k nearest kept
    items are searched, batch by batch: a pool of many copies of one image cannot crowd the
    kept copy out of an item's k neighbours. Within a batch, items are compared exactly
    (batch x batch). With index 'flat' the result is exact; with 'ivfpq' a duplicate can be
    missed when its kept twin is outside the probed lists or the PQ's top k, never invented.
    Memory: O(N * D) for the index plus O(batch_size * (batch_size + k + D)).
    """
    features = _check_features(features, "features")
    _check_search_args(threshold, k, batch_size)
    n, dim = features.shape
    choice = _resolve_choice(index, n, dim, flat_limit)
    kept_index = _build_index(choice, dim, features)
    kept_items = np.empty(n, np.int64)  # row r of kept_index holds item kept_items[r]
    n_kept = 0
    targets = np.full(n, -1, np.int64)
    for start in range(0, n, batch_size):
        batch = features[start : start + batch_size]
        kept_so_far = kept_items[:n_kept]
        prior_item, prior_sim = _best_exact(kept_index, kept_so_far, features, batch, k, threshold)
        kept = prior_item < 0
        sims = batch @ batch.T
        near = np.tril(sims >= threshold, -1)  # near[i, j]: j earlier in the batch than i
        # Only a survivor near an earlier survivor waits on that one's fate.
        for i in np.flatnonzero(kept & (near & kept[None, :]).any(axis=1)).tolist():
            if (near[i] & kept).any():
                kept[i] = False
        local = np.where(near & kept[None, :], sims, -np.inf)
        local_item = local.argmax(axis=1)  # first maximum: lowest index
        local_sim = local[np.arange(len(batch)), local_item]
        use_local = local_sim > prior_sim  # tie -> the earlier batch's, lower index
        block_targets = np.where(use_local, start + local_item, prior_item)
        targets[start : start + len(batch)] = np.where(kept, -1, block_targets)
        new_kept = np.flatnonzero(kept)
        kept_index.add(batch[new_kept])
        kept_items[n_kept : n_kept + len(new_kept)] = start + new_kept
        n_kept += len(new_kept)
    return targets, choice


def matches_by_embedding(
    queries: np.ndarray, references: np.ndarray, threshold: float, index: str = "auto",
    k: int = 16, flat_limit: int = 2_000_000, *, batch_size: int = EMBEDDING_BATCH,
) -> tuple[np.ndarray, EmbeddingIndexChoice]:
    """(int64 [Q]: the most similar reference with cosine >= threshold (ties -> lowest index),
    else -1; the index used, chosen by the number of references).

    Both arrays float32, L2-normalised, same D. The index proposes k candidates per query, which
    are re-scored exactly as in duplicates_by_embedding."""
    queries = _check_features(queries, "queries")
    references = _check_features(references, "references")
    _check_search_args(threshold, k, batch_size)
    if queries.shape[1] != references.shape[1]:
        raise ValueError(f"queries have {queries.shape[1]} dims, references {references.shape[1]}")
    n, dim = references.shape
    choice = _resolve_choice(index, n, dim, flat_limit)
    reference_index = _build_index(choice, dim, references)
    for start in range(0, n, batch_size * 16):  # slices bound faiss's per-call temporaries
        reference_index.add(references[start : start + batch_size * 16])
    matches = np.full(len(queries), -1, np.int64)
    rows = np.arange(n, dtype=np.int64)
    for start in range(0, len(queries), batch_size):
        batch = queries[start : start + batch_size]
        matches[start : start + len(batch)] = _best_exact(
            reference_index, rows, references, batch, k, threshold
        )[0]
    return matches, choice
