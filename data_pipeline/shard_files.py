"""What a shard folder may hold (reading the tars is data_pipeline.shard_format's job).

A shard folder holds, per shard N (zero-padded, e.g. 00000): N.tar (the samples), N.parquet
(img2dataset's per-URL record, failures included) and N_stats.json (written last, so it marks a
finished shard); plus our sizes.json, manifest.json and img2dataset.log, and img2dataset's _tmp/
scratch folder if a run was killed. Anything else is *foreign*: we refuse to write next to it and
never delete it (img2dataset's own "overwrite" mode would `rm -r` the whole folder).
"""

from __future__ import annotations

import re

import fsspec

from data_pipeline.errors import UserError

SHARD_DIGITS = 5  # img2dataset's default oom_shard_count: 00000.tar, which we never change
SHARD_TAR = re.compile(r"^(\d+)\.tar$")
SHARD_FILE = re.compile(r"^(\d+)(\.tar|\.parquet|_stats\.json)$")
SIZES_FILE = "sizes.json"
MANIFEST_FILE = "manifest.json"
LOG_FILE = "img2dataset.log"
OUR_FILES = frozenset({SIZES_FILE, MANIFEST_FILE, LOG_FILE, "_tmp"})


def _fresh(output: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The folder's filesystem and path, with any listing it cached dropped: object-store
    filesystems (s3fs) cache listings, and img2dataset's processes write past that cache."""
    fs, path = fsspec.core.url_to_fs(output)
    fs.invalidate_cache(path)
    return fs, path


def _has_buckets(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return bool({"s3", "s3a", "gs", "gcs", "az", "abfs"} & set(protocols))


def _names(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False))


def check_output_folder(output: str, incremental: bool, entries: frozenset[str] | None = None) -> bool:
    """Refuse a folder we could damage; return True if it already holds our output.

    By default the folder must be a shard folder; `entries` instead names everything that may
    be in it (the demo root: its split folders and corpus.json, and no loose shards)."""
    fs, path = _fresh(output)
    if not fs.exists(path):
        bucket = path.strip("/").split("/", 1)[0]
        # Object stores have no folders to create, only buckets: img2dataset would fail in
        # every worker, after the URL list is sharded, with a traceback per shard in its log.
        if _has_buckets(fs) and not fs.exists(bucket):
            raise UserError(f"--output {output}: no bucket {bucket!r} (or these credentials "
                            "cannot see it); create it first")
        return False
    if not fs.isdir(path):
        raise UserError(f"--output {output} is a file, not a folder")
    names = _names(fs, path)
    if entries is None:
        ours = [n for n in names if SHARD_FILE.match(n) or n in OUR_FILES]
    else:
        ours = [n for n in names if n in entries]
    foreign = [n for n in names if n not in ours]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(
            f"--output {output} holds files that are not ours ({shown}); "
            "choose an empty or new folder (nothing was changed)"
        )
    if ours and not incremental:
        raise UserError(
            f"--output {output} already holds shards; pass --incremental to keep them and download "
            "only the unfinished ones, or choose another folder"
        )
    return bool(ours)


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{SHARD_DIGITS}d}"


def finished_shard_ids(output: str) -> set[int]:
    """Shards img2dataset completed: it writes N_stats.json only after closing N.tar."""
    fs, path = _fresh(output)
    if not fs.exists(path):
        return set()
    return {
        int(n.split("_")[0]) for n in _names(fs, path) if n.endswith("_stats.json") and SHARD_FILE.match(n)
    }


def shard_tars(output: str) -> list[str]:
    """Names of the shard tars in a folder, in shard order."""
    fs, path = _fresh(output)
    return sorted((n for n in _names(fs, path) if SHARD_TAR.match(n)), key=lambda n: int(n.split(".")[0]))
