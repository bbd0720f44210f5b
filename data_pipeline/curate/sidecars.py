"""Per-shard sidecar files of the curation passes: written atomically, reused when still valid.

A sidecar is one file per input shard under OUT/_work/<pass>/, named after the shard. It records
the identity of what it was computed from (the shard's path, size and modification time, and
whatever else the pass depends on, e.g. the embedding model), so a rerun reuses a finished
sidecar, recomputes a stale one and never mixes the two. Written to a temporary name and
renamed: a killed pass leaves no half-written sidecar that a resume could take for finished.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

WORK_DIR = "_work"


def shard_identity(url: str) -> dict[str, Any]:
    """What a sidecar of `url` depends on; a local shard's size and mtime catch a rewrite."""
    if "://" in url or not os.path.exists(url):
        return {"shard": url}
    stat = os.stat(url)
    return {"shard": str(Path(url).resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def identity_digest(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def sidecar_path(out: Path, pass_name: str, url: str, suffix: str) -> Path:
    """OUT/_work/<pass>/<shard stem>-<digest of the shard's path><suffix>: two input folders with
    the same shard names (a pool given as `a::b`) never share a sidecar."""
    stem = url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".tar")
    where = hashlib.sha256(url.encode()).hexdigest()[:8]
    return Path(out) / WORK_DIR / pass_name / f"{stem}-{where}{suffix}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
