"""The curated pool as new webdataset shards: the kept samples, copied member by member.

Images and metadata are copied byte for byte (no re-encode); the caption is the normalised one
when the caption step ran. Output shards hold `samples_per_shard` samples each (img2dataset's
default 10,000), in pool order, and come with sizes.json and a per-shard parquet (key, caption,
sha256, clip_score where known), like a shard folder `make shards` writes, so every reader of
shards (trainer, eval, validate, this stage again) takes them as they are. Each tar is written
to a temporary name and renamed.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Iterator

import pandas as pd

from data_pipeline.shard_files import shard_name
from data_pipeline.shard_format import read_shard

_MEMBER_ORDER = ("jpg", "jpeg", "png", "webp", "txt", "json", "cls")


def _kept_samples(kept: pd.DataFrame) -> Iterator[tuple[dict, dict]]:
    """(raw sample, its kept row) for every kept row, shard by shard in pool order."""
    for url, rows in kept.groupby("shard", sort=False):
        wanted = {key: row for key, row in zip(rows["key"], rows.to_dict("records"))}
        for raw in read_shard(url):
            row = wanted.get(raw.get("__key__"))
            if row is not None and not raw.get("__error__"):
                yield raw, row


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime 0: same bytes on a rerun
    tar.addfile(info, io.BytesIO(data))


def _finish(out: Path, index: int, tar_bytes: io.BytesIO, rows: list[dict]) -> tuple[str, int]:
    name = shard_name(index)
    for suffix, data in ((".tar", tar_bytes.getvalue()), (".parquet", None)):
        target = out / f"{name}{suffix}"
        tmp = out / f".{name}{suffix}.tmp{os.getpid()}"
        if data is None:
            pd.DataFrame(rows).to_parquet(tmp, index=False)
        else:
            tmp.write_bytes(data)
        os.replace(tmp, target)
    return f"{name}.tar", len(rows)


def write_curated_shards(kept: pd.DataFrame, out: Path, samples_per_shard: int = 10_000) -> dict[str, int]:
    """kept: the kept pool rows (shard, key, caption, ...), in pool order. -> sizes.json's table."""
    out.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    index, rows = 0, []
    buffer = io.BytesIO()
    tar = tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT)
    written: set[str] = set()
    for raw, row in _kept_samples(kept):
        key = raw["__key__"]
        if key in written:  # two input folders with the same keys (`a::b`): keep both samples
            key = f"{Path(row['shard']).stem}_{key}"
        written.add(key)
        for ext in sorted((e for e in raw if not e.startswith("__")),
                          key=lambda e: (_MEMBER_ORDER.index(e) if e in _MEMBER_ORDER else 99, e)):
            data = row["caption"].encode("utf-8") if ext == "txt" else raw[ext]
            _add(tar, f"{key}.{ext}", data)
        rows.append({"key": key, **{c: row[c] for c in ("caption", "sha256", "clip_score") if c in row},
                     "source_shard": row["shard"], "source_key": raw["__key__"], "status": "success"})
        if len(rows) == samples_per_shard:
            tar.close()
            name, n = _finish(out, index, buffer, rows)
            sizes[name] = n
            index, rows, buffer = index + 1, [], io.BytesIO()
            tar = tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT)
    tar.close()
    if rows:
        name, n = _finish(out, index, buffer, rows)
        sizes[name] = n
    (out / "sizes.json").write_text(json.dumps(sizes, indent=2))
    return sizes
