"""MetaCLIP's balancing (Xu et al. 2023, "Demystifying CLIP Data", section 3.3).

Captions are matched against a list of metadata entries by substring; an entry matched by more
than t pairs is a "head" entry (e.g. "photo"), and each of its pairs survives that entry's draw
with probability t / count. A pair is kept if any of its entries' draws keeps it, so a pair that
also mentions a rare ("tail") entry is always kept. MetaCLIP set t = 20k for 400M pairs.

Matching is case-insensitive substring search, as MetaCLIP's (so "cat" also matches "category";
use entries with surrounding spaces to ask for whole words), through a character trie: one walk
per caption position, independent of the number of entries. The draws are seeded per pair from
(seed, shard, key, entry), so the result does not depend on the order rows are processed in, or
on how the pool is split across ranks.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from data_pipeline.errors import UserError

_END = "\0"  # trie marker: the entry that ends at this node


def read_entries(path: Path) -> list[str]:
    entries = [line.strip().lower() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    entries = list(dict.fromkeys(e for e in entries if e))  # keep order, drop repeats
    if not entries:
        raise UserError(f"--balance-entries {path}: no entries (one metadata string per line)")
    return entries


def _trie(entries: Sequence[str]) -> dict:
    root: dict = {}
    for entry in entries:
        node = root
        for char in entry:
            node = node.setdefault(char, {})
        node[_END] = entry
    return root


def match_entries(captions: Sequence[str], entries: Sequence[str]) -> list[list[str]]:
    """Per caption, the entries it contains (each once, in order of first occurrence)."""
    root = _trie(entries)
    matched = []
    for caption in captions:
        text, found = caption.lower(), {}
        for start in range(len(text)):
            node = root
            for char in text[start:]:
                node = node.get(char)
                if node is None:
                    break
                if _END in node:
                    found.setdefault(node[_END], None)
        matched.append(list(found))
    return matched


def _uniform(seed: int, shard: str, key: str, entry: str) -> float:
    digest = hashlib.blake2b(f"{seed}\x1f{shard}\x1f{key}\x1f{entry}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def balance(
    captions: Sequence[str], shards: Sequence[str], keys: Sequence[str], entries: Sequence[str],
    per_entry: int, keep_unmatched: bool, seed: int,
) -> tuple[np.ndarray, dict[str, int]]:
    """-> (bool [N], True = removed; entry -> number of pairs matching it, before balancing)."""
    matched = match_entries(captions, entries)
    counts = Counter(entry for found in matched for entry in found)
    removed = np.zeros(len(captions), dtype=bool)
    for i, found in enumerate(matched):
        if not found:
            removed[i] = not keep_unmatched
            continue
        removed[i] = not any(
            counts[e] <= per_entry or _uniform(seed, shards[i], keys[i], e) < per_entry / counts[e]
            for e in found
        )
    return removed, dict(counts.most_common())
