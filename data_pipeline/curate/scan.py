"""The scan pass: one read of every shard, giving the pool table the filters work on.

Per sample: shard, key, caption, the stored image bytes' sha256, a 64-bit perceptual hash and
the image size. img2dataset's own sha256 (its `compute_hash` option, on by default in `make
shards`) is carried along as `download_sha256`, but it hashes the file as downloaded, before the
resize, so it cannot be compared with a hash of a shard made elsewhere: exact dedup uses the
stored bytes' hash, computed here for every shard. Nothing is lost by that: img2dataset's resize
is deterministic, so two identical downloads are stored as identical bytes. A DataComp-style
`uid` column of the parquet is carried along for the DataComp subset file.

Only samples the trainer would use are in the table: an unreadable sample or a damaged tar is
counted (and said) but is not a pair to curate. Each shard's rows go to a parquet sidecar
(`sidecars`), so the pass resumes per shard and splits across processes and ranks.
"""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from PIL import Image

from data_pipeline.curate.hash_duplicates import perceptual_hash
from data_pipeline.curate.sidecars import atomic_write_bytes, identity_digest, shard_identity, sidecar_path
from data_pipeline.shard_format import BadSample, decode_caption, decode_image, read_shard

logger = logging.getLogger(__name__)

SCAN_VERSION = 3
PASS = "scan"
COLUMNS = ["shard", "key", "caption", "sha256", "download_sha256", "phash", "tiny", "width", "height",
           "uid"]
TINY_SIDE = 16


def tiny_image(image) -> np.ndarray:
    """The "tiny image" descriptor (Torralba et al. 2008): the image box-filtered to 16x16 RGB,
    mean-removed and L2-normalised, so the cosine of two is their pixel correlation. Unlike a
    perceptual hash it sees colour; re-encodes and resizes keep it above 0.99 (demo_noise)."""
    pixels = np.asarray(image.resize((TINY_SIDE, TINY_SIDE), Image.BOX), np.float32).reshape(-1)
    pixels = pixels - pixels.mean()
    return pixels / max(float(np.linalg.norm(pixels)), 1e-6)


@dataclass
class ShardScan:
    url: str
    rows: int
    unreadable: int
    damaged: str | None  # the tar's error, if it broke
    reused: bool


def _parquet_columns(url: str) -> dict[str, dict[str, str]]:
    """key -> {sha256, uid} from img2dataset's parquet beside the tar, where there is one."""
    parquet = url[: -len(".tar")] + ".parquet" if url.endswith(".tar") else None
    if parquet is None or "://" in parquet or not Path(parquet).is_file():
        return {}
    names = set(pq.read_schema(parquet).names)
    wanted = [c for c in ("key", "status", "sha256", "uid") if c in names]
    if "key" not in wanted or not ({"sha256", "uid"} & names):
        return {}
    table = pq.read_table(parquet, columns=wanted).to_pydict()
    found = {}
    for i, key in enumerate(table["key"]):
        if "status" in table and table["status"][i] != "success":
            continue
        found[str(key)] = {c: table[c][i] for c in ("sha256", "uid") if c in table and table[c][i]}
    return found


def scan_rows(url: str) -> tuple[pd.DataFrame, int, str | None]:
    """-> (one row per usable sample, unreadable samples, the tar's error or None)."""
    from_parquet = _parquet_columns(url)
    rows, unreadable, damaged = [], 0, None
    for raw in read_shard(url):
        if raw.get("__error__"):
            if raw.get("__key__"):
                unreadable += 1
            else:
                damaged = raw["__error__"]
            continue
        try:
            caption = decode_caption(raw)
            image = decode_image(raw)
        except BadSample:
            unreadable += 1
            continue
        image_bytes = next(raw[ext] for ext in ("jpg", "jpeg", "png", "webp") if ext in raw)
        known = from_parquet.get(raw["__key__"], {})
        phash = int(perceptual_hash(image))
        rows.append({
            "shard": url,
            "key": raw["__key__"],
            "caption": caption,
            "sha256": hashlib.sha256(image_bytes).hexdigest(),
            "download_sha256": known.get("sha256"),
            # stored as int64 (not every parquet reader has uint64); reinterpreted on load
            "phash": phash - (1 << 64) if phash >= 1 << 63 else phash,
            "tiny": tiny_image(image).astype(np.float16).tobytes(),
            "width": image.width,
            "height": image.height,
            "uid": known.get("uid"),
        })
    frame = pd.DataFrame(rows, columns=COLUMNS)
    return frame, unreadable, damaged


def _identity(url: str) -> dict:
    return {"pass": PASS, "version": SCAN_VERSION, **shard_identity(url)}


def scan_shard(out: Path, url: str) -> ShardScan:
    path = sidecar_path(out, PASS, url, ".parquet")
    digest = identity_digest(_identity(url))
    if path.is_file():
        meta = pq.read_schema(path).metadata or {}
        if meta.get(b"identity") == digest.encode():
            return ShardScan(url, int(meta[b"rows"]), int(meta[b"unreadable"]),
                             meta[b"damaged"].decode() or None, reused=True)
    frame, unreadable, damaged = scan_rows(url)
    table = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata({
        "identity": digest, "rows": str(len(frame)), "unreadable": str(unreadable),
        "damaged": damaged or "",
    })
    sink = io.BytesIO()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue())
    return ShardScan(url, len(frame), unreadable, damaged, reused=False)


def _scan_one(args: tuple[Path, str]) -> ShardScan:
    return scan_shard(*args)


def scan_shards(out: Path, urls: list[str], workers: int) -> list[ShardScan]:
    """Scan every shard (reusing finished sidecars), `workers` processes at a time."""
    jobs = [(out, url) for url in urls]
    if workers <= 1 or len(urls) <= 1:
        return [scan_shard(out, url) for url in urls]
    with multiprocessing.get_context("spawn").Pool(min(workers, len(urls))) as pool:
        return pool.map(_scan_one, jobs, chunksize=1)


def load_pool(out: Path, urls: list[str]) -> pd.DataFrame:
    """The scanned pool in priority order (the shards' order, then keys): earlier rows are the
    copies dedup keeps. `phash` comes back as uint64."""
    frames = [pd.read_parquet(sidecar_path(out, PASS, url, ".parquet")) for url in urls]
    pool = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    pool["phash"] = pool["phash"].astype("int64").astype("uint64")
    return pool.reset_index(drop=True)


def tiny_images(pool: pd.DataFrame) -> np.ndarray:
    """The pool's tiny-image descriptors, float32 [N, 768], renormalised after float16."""
    if len(pool) == 0:
        return np.zeros((0, 3 * TINY_SIDE * TINY_SIDE), np.float32)
    array = np.frombuffer(b"".join(pool["tiny"]), dtype=np.float16).reshape(len(pool), -1).astype(np.float32)
    return array / np.linalg.norm(array, axis=1, keepdims=True).clip(1e-6)
