"""Near-duplicate images by embedding cosine, through faiss (an exact flat index, or IVF-PQ
for large pools), with the same greedy rule and return values as `hash_duplicates`: see there.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import numpy as np

EMBEDDING_BATCH = 2048
INDEX_KINDS = ("auto", "flat", "ivfpq")
NORM_TOLERANCE = 1e-3  # fp16 round trips of unit vectors stay well inside this
IVFPQ_SEED = 0
IVFPQ_NBITS = 8
# faiss warns below 39 training points per centroid; a PQ with 8 bits has 256 per sub-quantizer.
MIN_POINTS_PER_CENTROID = 39
IVFPQ_MIN_VECTORS = MIN_POINTS_PER_CENTROID * 2**IVFPQ_NBITS


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
