"""sizes.json and manifest.json of a shard folder, and the summary table printed after a run.

sizes.json maps each finished shard tar to its sample count (OpenCLIP reads it to know the
dataset size without opening the tars). manifest.json records what a run produced and why URLs
failed. Both are read back from img2dataset's per-shard parquet (one row per URL, with `status`
and `error_message`): it writes a tar sample exactly for each "success" row, and reading the
parquet takes a fraction of the time of walking 20k tar headers. `validate` then checks that
the tars really hold what sizes.json says.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
import time
from collections import Counter
from typing import Iterable, TextIO

import fsspec
import pyarrow.parquet as pq

from data_pipeline.shard_config import ShardConfig
from data_pipeline.shard_files import MANIFEST_FILE, SIZES_FILE, finished_shard_ids, shard_name, shard_tars

MANIFEST_VERSION = 1
_PARQUET_COLUMNS = [
    "caption",
    "status",
    "error_message",
    "width",
    "height",
    "original_width",
    "original_height",
]
# (pattern on img2dataset's error message, reason we count it under), first match wins. Raw
# messages embed URLs, hosts and errno texts, so counting them verbatim gives one "reason" per URL.
_REASONS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), reason)
    for pattern, reason in (
        (r"HTTP Error (\d{3})", r"http \1"),
        (r"timed? ?out", "timeout"),
        (r"Name or service not known|name resolution|getaddrinfo|nodename nor servname", "dns lookup failed"),
        (r"Connection refused", "connection refused"),
        (
            r"Connection reset|Remote end closed|RemoteDisconnected|IncompleteRead|BadStatusLine",
            "connection dropped",
        ),
        (r"SSL|certificate", "tls error"),
        (r"urlopen error|unknown url type|URLError", "bad url or network error"),
        (r"decod|cannot identify image|truncated|not a .*image", "undecodable image"),
        (r"image too small", "image too small"),
        (r"area too large", "image area too large"),
        (r"aspect ratio too large", "aspect ratio too large"),
        (r"hash mismatch", "hash mismatch"),
        (r"X-Robots-Tag", "opted out (X-Robots-Tag)"),
    )
)


def failure_reason(message: str | None) -> str:
    """Normalise one img2dataset error message into a short reason."""
    text = message or ""
    for pattern, reason in _REASONS:
        match = pattern.search(text)
        if match:
            return match.expand(reason)
    return "other"


def describe(values: Iterable[float]) -> dict[str, float] | None:
    data = list(values)
    if not data:
        return None
    return {
        "min": min(data),
        "median": statistics.median(data),
        "mean": round(statistics.fmean(data), 2),
        "max": max(data),
    }


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict | None:
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as handle:
        return json.load(handle)


def read_manifest(output: str) -> dict | None:
    fs, path = fsspec.core.url_to_fs(output)
    return _read_json(fs, f"{path}/{MANIFEST_FILE}")


def remove_derived_files(output: str) -> None:
    """Delete our sizes.json and manifest.json (rewritten after the run).

    img2dataset treats every *.json in the folder as a shard's stats file named N_stats.json and
    crashes on int('sizes.json'), so they cannot stay while it runs."""
    fs, path = fsspec.core.url_to_fs(output)
    for name in (SIZES_FILE, MANIFEST_FILE):
        if fs.exists(f"{path}/{name}"):
            fs.rm(f"{path}/{name}")


def build_manifest(
    config: ShardConfig, run: dict[str, object], expected_shards: int
) -> tuple[dict, dict[str, int]]:
    """Read back a shard folder; return (manifest, sizes). Only finished shards are counted."""
    fs, path = fsspec.core.url_to_fs(config.output)
    finished = finished_shard_ids(config.output)
    shard_ids = sorted(finished)
    sizes: dict[str, int] = {}
    status: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    examples: dict[str, str] = {}
    words: list[int] = []
    chars: list[int] = []
    widths: list[int] = []
    heights: list[int] = []
    original_sides: list[int] = []
    for shard_id in shard_ids:
        name = shard_name(shard_id)
        with fs.open(f"{path}/{name}.parquet", "rb") as handle:
            table = pq.read_table(handle, columns=_PARQUET_COLUMNS).to_pydict()
        shard_successes = 0
        for i, state in enumerate(table["status"]):
            status[state] += 1
            if state == "success":
                shard_successes += 1
                caption = table["caption"][i] or ""
                words.append(len(caption.split()))
                chars.append(len(caption))
                widths.append(table["width"][i])
                heights.append(table["height"][i])
                original_sides.append(min(table["original_width"][i], table["original_height"][i]))
            else:
                reason = failure_reason(table["error_message"][i])
                reasons[reason] += 1
                examples.setdefault(reason, str(table["error_message"][i])[:200])
        sizes[f"{name}.tar"] = shard_successes
    # A tar without its stats file is a shard img2dataset started but did not finish.
    unfinished = [t for t in shard_tars(config.output) if int(t.split(".")[0]) not in finished]
    urls = sum(status.values())
    successes = status.get("success", 0)
    manifest = {
        "format_version": MANIFEST_VERSION,
        "complete": finished >= set(range(expected_shards)) and not unfinished,
        "shards": {
            "finished": len(shard_ids),
            "expected": expected_shards,
            "unfinished": unfinished,
            "samples": sum(sizes.values()),
        },
        "totals": {
            "urls": urls,
            "success": successes,
            "failed_to_download": status.get("failed_to_download", 0),
            "failed_to_resize": status.get("failed_to_resize", 0),
            "success_rate": round(successes / urls, 4) if urls else 0.0,
        },
        "failure_reasons": dict(reasons.most_common()),
        "failure_examples": examples,
        "caption_words": describe(words),
        "caption_chars": describe(chars),
        "image_width": describe(widths),
        "image_height": describe(heights),
        "original_shorter_side": describe(original_sides),
        "layout": config.layout_options(),
        "options": dataclasses.asdict(config),
        "run": run,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return manifest, sizes


def write_manifest(output: str, manifest: dict, sizes: dict[str, int]) -> None:
    fs, path = fsspec.core.url_to_fs(output)
    with fs.open(f"{path}/{SIZES_FILE}", "w") as handle:
        json.dump(sizes, handle, indent=2)
    with fs.open(f"{path}/{MANIFEST_FILE}", "w") as handle:
        json.dump(manifest, handle, indent=2)


def _stat_line(stats: dict[str, float] | None, unit: str = "") -> str:
    if not stats:
        return "-"
    return "  ".join(f"{name} {stats[name]}{unit}" for name in ("min", "median", "mean", "max"))


def print_summary(title: str, manifest: dict, out: TextIO) -> None:
    totals, run = manifest["totals"], manifest["run"]
    shards = manifest["shards"]
    rows = [
        ("shards", f"{shards['finished']}/{shards['expected']} finished, {shards['samples']} samples"),
        ("urls", str(totals["urls"])),
        ("downloaded", f"{totals['success']} ({100 * totals['success_rate']:.1f}%)"),
        ("failed", f"{totals['urls'] - totals['success']}"),
        *((f"  {reason}", str(n)) for reason, n in manifest["failure_reasons"].items()),
        ("caption words", _stat_line(manifest["caption_words"])),
        ("caption chars", _stat_line(manifest["caption_chars"])),
        ("image width", _stat_line(manifest["image_width"], "px")),
        ("image height", _stat_line(manifest["image_height"], "px")),
        (
            "time",
            f"{run['elapsed_s']:.1f} s, {run['images_per_s']:.0f} images/s "
            f"({run['shards_downloaded']} shards downloaded, {run['shards_skipped']} already done)",
        ),
    ]
    if shards["unfinished"]:
        rows.append(("UNFINISHED", ", ".join(shards["unfinished"])))
    width = max(len(label) for label, _ in rows)
    print(title, file=out)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}", file=out)
