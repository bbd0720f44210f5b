"""Turn one URL list into one shard folder: check, download, count, describe.

The order matters: every check that can refuse (the folder, the list, an incremental rerun with
different options) runs before img2dataset starts, so a refusal leaves the folder as it was.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import TextIO

import fsspec

from data_pipeline.errors import UserError
from data_pipeline.img2dataset_runner import log_path_for, run_img2dataset
from data_pipeline.manifest import (
    build_manifest,
    print_summary,
    read_manifest,
    remove_derived_files,
    write_manifest,
)
from data_pipeline.shard_config import ShardConfig
from data_pipeline.shard_files import check_output_folder, finished_shard_ids, shard_name
from data_pipeline.url_list import inspect_url_list


def _check_same_layout(config: ShardConfig, previous: dict | None) -> None:
    """An incremental rerun must cut the list into the same shards as the run it resumes."""
    if previous is None:
        return
    before = previous.get("layout", {})
    now = config.layout_options()
    changed = [f"{k} was {before.get(k)!r}, now {now[k]!r}" for k in now if before.get(k) != now[k]]
    if changed:
        raise UserError(
            f"--output {config.output} was built with other options ({'; '.join(changed)}); "
            "rerun with the same options or use a new folder"
        )


def is_complete(config: ShardConfig, expected: int) -> bool:
    """True if all `expected` shards are finished and described by a manifest."""
    if read_manifest(config.output) is None:
        return False
    return finished_shard_ids(config.output) >= set(range(expected))


def _run_stats(config: ShardConfig, new_shards: set[int], elapsed: float) -> dict[str, float | int]:
    """Throughput of this run, from the stats files of the shards it wrote."""
    fs, path = fsspec.core.url_to_fs(config.output)
    urls = successes = 0
    for shard_id in new_shards:
        with fs.open(f"{path}/{shard_name(shard_id)}_stats.json", "r") as handle:
            stats = json.load(handle)
        urls += stats["count"]
        successes += stats["successes"]
    return {
        "elapsed_s": round(elapsed, 2),
        "urls": urls,
        "images": successes,
        "urls_per_s": round(urls / elapsed, 1) if elapsed > 0 else 0.0,
        "images_per_s": round(successes / elapsed, 1) if elapsed > 0 else 0.0,
    }


def _describe_folder(
    config: ShardConfig, expected: int, done_before: set[int], elapsed: float, interrupted: bool
) -> dict | None:
    fs, path = fsspec.core.url_to_fs(config.output)
    if not fs.isdir(path):  # stopped before img2dataset created it: nothing to describe
        return None
    new_shards = finished_shard_ids(config.output) - done_before
    run = {
        **_run_stats(config, new_shards, elapsed),
        "shards_downloaded": len(new_shards),
        "shards_skipped": len(done_before),
        "interrupted": interrupted,
    }
    manifest, sizes = build_manifest(config, run, expected)
    write_manifest(config.output, manifest, sizes)
    return manifest


def build_shards(
    config: ShardConfig,
    url_list: str,
    label: str = "shards",
    out: TextIO = sys.stdout,
    folder_checked: bool = False,
) -> dict:
    """Download `url_list` into `config.output`; return the manifest written there.

    Raises UserError when the folder or the list is unusable, when no image at all downloaded,
    and when shards are left unfinished (the summary is printed first in both latter cases)."""
    if not folder_checked:
        check_output_folder(config.output, config.incremental)
    info = inspect_url_list(config, url_list)
    previous = read_manifest(config.output)
    _check_same_layout(config, previous)

    expected = info.expected_shards(config.samples_per_shard)
    done_before = finished_shard_ids(config.output)
    if previous is not None and is_complete(config, expected):
        print(
            f"{label}: all {expected} shards already finished in {config.output}; nothing to download",
            file=out,
        )
        return previous
    # Every pool worker imports torch (through webdataset) before its first shard, seconds each:
    # never start more workers than there are shards to download.
    config = dataclasses.replace(config, processes=max(1, min(config.processes, expected - len(done_before))))

    remove_derived_files(config.output)
    log = log_path_for(config.output)
    print(f"{label}: downloading into {config.output} (img2dataset log: {log})", file=out, flush=True)
    try:
        elapsed = run_img2dataset(config, url_list, label, expected)
    except BaseException:
        # Ctrl-C or a crash: still describe what finished, so the next incremental run finds the
        # options it must match. Best effort: the original error is what the user must see.
        try:
            _describe_folder(config, expected, done_before, 0.0, interrupted=True)
        except Exception as exc:  # noqa: BLE001
            print(f"warning: could not write {config.output}/manifest.json: {exc}", file=sys.stderr)
        raise
    manifest = _describe_folder(config, expected, done_before, elapsed, interrupted=False)
    if manifest is None:
        raise UserError(f"img2dataset wrote nothing to {config.output}; see {log}")
    print_summary(f"{label}: {config.output}", manifest, out)

    if manifest["totals"]["success"] == 0:
        reasons = (
            ", ".join(f"{r}: {n}" for r, n in manifest["failure_reasons"].items()) or "no shard finished"
        )
        raise UserError(
            f"nothing was downloaded into {config.output}: all {manifest['totals']['urls']} URLs failed "
            f"({reasons}); see {log}"
        )
    if not manifest["complete"]:
        raise UserError(
            f"some shards of {config.output} did not finish (see {log}); rerun with --incremental"
        )
    return manifest
