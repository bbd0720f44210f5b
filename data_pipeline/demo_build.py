"""Build the offline demo corpus for real: render, serve on 127.0.0.1, download with img2dataset.

Layout written under OUTPUT:
    corpus.json      vocabulary, held-out pairs, zero-shot class names, split sizes (corpus.json
                     is written before downloading, so an interrupted build can be resumed)
    train/ val/ heldout/   one shard folder each (N.tar, N.parquet, N_stats.json, sizes.json,
                           manifest.json, img2dataset.log)

The rendered source images and the URL lists live in a temporary folder (prefix
`clipstream-demo-`, in /dev/shm when it has room, else the system temp dir) that is deleted when
the build ends, whether it succeeds or not; the shards are the product, the sources can be
redrawn from the seed at any time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

import fsspec

from data_pipeline.captions import CAPTION_VERSION
from data_pipeline.demo_corpus import (
    ATTRIBUTE_COLUMNS,
    SPLITS,
    DemoConfig,
    PlannedRow,
    corpus_description,
)
from data_pipeline.demo_noise import NOISE_RATES, noise_truth, plan_pool
from data_pipeline.errors import UserError
from data_pipeline.loopback_server import serve_folder
from data_pipeline.manifest import read_manifest
from data_pipeline.shape_rendering import RENDERER_VERSION, render_rows
from data_pipeline.shard_build import build_shards, is_complete
from data_pipeline.shard_config import ShardConfig
from data_pipeline.shard_files import check_output_folder
from data_pipeline.url_list import write_parquet_url_list

CORPUS_FILE = "corpus.json"
# tokenizer.json: the BPE `make tokenizer` trains on train/'s captions, kept beside the splits.
NOISE_FILE = "noise.json"
DEMO_ENTRIES = frozenset({*SPLITS, CORPUS_FILE, NOISE_FILE, "tokenizer.json"})


def split_config(config: ShardConfig, split: str) -> ShardConfig:
    """The shard config of one split: its own folder, and the URL-list columns the demo writes."""
    return dataclasses.replace(
        config,
        output=f"{config.output.rstrip('/')}/{split}",
        url_list=None,  # a fresh temporary file each run; the seed, not the path, fixes the rows
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        extra_columns=ATTRIBUTE_COLUMNS,
    )


def _check_same_corpus(config: ShardConfig, description: dict) -> None:
    """An incremental rerun must plan the same rows as the build it resumes."""
    fs, root = fsspec.core.url_to_fs(config.output)
    path = f"{root}/{CORPUS_FILE}"
    if not fs.exists(path):
        return
    with fs.open(path, "r") as handle:
        before = json.load(handle).get("generator", {})
    now = description["generator"]
    changed = [f"{k} was {before.get(k)!r}, now {now[k]!r}" for k in now if before.get(k) != now[k]]
    if changed:
        raise UserError(
            f"--output {config.output} holds a demo corpus built with other options ({'; '.join(changed)}); "
            "rerun with the same options or use a new folder"
        )


def _scratch_parent(rows: int, render_size: int) -> str | None:
    """/dev/shm (memory) when it exists and has room, else None (tempfile's default).

    The sources are ~20k small files written, served once and deleted; on a busy disk the
    writes and unlinks alone took longer than the whole download."""
    shm = "/dev/shm"
    expected_bytes = rows * render_size * render_size // 4  # JPEGs of flat shapes: ~2-4 KB at 128 px
    if os.path.isdir(shm) and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 4 * expected_bytes:
        return shm
    return None


def _url_records(rows: list[PlannedRow], base_url: str) -> list[dict[str, object]]:
    return [
        {"url": f"{base_url}/{row.file_name}", "caption": row.caption, **row.attributes()} for row in rows
    ]


def build_demo(demo: DemoConfig, config: ShardConfig, out: TextIO = sys.stdout) -> dict[str, dict]:
    """Build (or resume, with config.incremental) the demo corpus under config.output.

    Returns each split's manifest. Raises UserError if the folder is not usable."""
    started = time.perf_counter()
    check_output_folder(config.output, config.incremental, entries=DEMO_ENTRIES)
    configs = {split: split_config(config, split) for split in SPLITS}
    for split_cfg in configs.values():
        check_output_folder(split_cfg.output, config.incremental)
    plans = {split: plan_pool(demo, split) for split in SPLITS}
    description = corpus_description(demo, config.image_size, {s: len(rows) for s, rows in plans.items()})
    description["generator"]["renderer_version"] = RENDERER_VERSION
    description["generator"]["caption_version"] = CAPTION_VERSION
    if demo.noise:  # a pool planted at other rates is another pool: no incremental mixing
        description["generator"]["noise_rates"] = dict(NOISE_RATES)
    _check_same_corpus(config, description)

    expected = {s: math.ceil(len(plans[s]) / config.samples_per_shard) for s in SPLITS}
    if all(is_complete(configs[s], expected[s]) for s in SPLITS):
        print(f"demo corpus in {config.output} is complete (seed {demo.seed}); nothing to do", file=out)
        return {s: read_manifest(configs[s].output) or {} for s in SPLITS}

    fs, root = fsspec.core.url_to_fs(config.output)
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root}/{CORPUS_FILE}", "w") as handle:
        json.dump(description, handle, indent=2)
    if demo.noise:
        with fs.open(f"{root}/{NOISE_FILE}", "w") as handle:
            json.dump(noise_truth(demo), handle, indent=2)

    manifests: dict[str, dict] = {}
    all_rows = [row for split in SPLITS for row in plans[split]]
    scratch_parent = _scratch_parent(len(all_rows), demo.render_size)
    with tempfile.TemporaryDirectory(prefix="clipstream-demo-", dir=scratch_parent) as scratch:
        images = Path(scratch) / "images"
        render_started = time.perf_counter()
        render_rows(all_rows, images, demo.render_size, config.processes)
        print(
            f"rendered {len(all_rows)} source images ({demo.render_size}px) in "
            f"{time.perf_counter() - render_started:.1f} s",
            file=out,
            flush=True,
        )
        downloaded = 0
        with serve_folder(images) as base_url:
            for split in SPLITS:
                url_list = str(Path(scratch) / f"{split}.parquet")
                write_parquet_url_list(url_list, _url_records(plans[split], base_url))
                needs_download = not is_complete(configs[split], expected[split])
                manifests[split] = build_shards(
                    configs[split], url_list, label=split, out=out, folder_checked=True
                )
                downloaded += manifests[split]["run"]["images"] if needs_download else 0
    elapsed = time.perf_counter() - started
    total = sum(m["totals"]["success"] for m in manifests.values())
    print(
        f"demo corpus: {total} images in {config.output} ({', '.join(SPLITS)}); this run downloaded "
        f"{downloaded} in {elapsed:.1f} s end to end ({downloaded / elapsed:.0f} images/s, rendering "
        f"included); classes in {config.output}/{CORPUS_FILE}",
        file=out,
    )
    return manifests
