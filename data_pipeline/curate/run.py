"""The curation run: per-shard passes, then the steps in order, then what they decided.

Order, and why: the caption, decontamination and alignment filters judge each pair on its own,
so they run first; the dedup steps then choose kept copies among the pairs that passed them
(a duplicate with a good caption survives its first copy's bad one); balancing runs last, on
the counts of what is left, as in MetaCLIP.

Under torchrun every rank scans and embeds its slice of the shards; rank 0 waits for all of
them, then decides and writes alone (the decisions are global: dedup sees every hash).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from data_pipeline.curate import alignment, balance, decisions, exact_duplicates, grids
from data_pipeline.curate import embedding_duplicates, hash_duplicates, scan
from data_pipeline.curate.config import CurateConfig
from data_pipeline.curate.decisions import StepResult
from data_pipeline.curate.sidecars import WORK_DIR, sidecar_path
from data_pipeline.errors import UserError

SHARDS_DIR = "shards"
GRIDS_DIR = "grids"
HISTOGRAM = "clip_scores.png"
OUR_ENTRIES = frozenset({WORK_DIR, SHARDS_DIR, GRIDS_DIR, HISTOGRAM, decisions.KEEP_LIST,
                         decisions.DATACOMP_UIDS, decisions.REPORT_JSON, decisions.REPORT_TEXT})


def check_out_folder(out: Path, urls: list[str]) -> None:
    """--out may be new, or one of our earlier outputs (its sidecars are reused); never a
    folder with other files in it, nor the input shard folder."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    resolved = out.resolve()
    for url in urls:
        if "://" not in url and Path(url).resolve().parent == resolved:
            raise UserError(f"--out {out} is the input shard folder; the input is never "
                            "modified, choose another folder")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in OUR_ENTRIES
                         and not p.name.startswith("."))
        if foreign:
            raise UserError(f"--out {out} holds files that are not ours ({', '.join(foreign[:5])}); "
                            "choose an empty or new folder (nothing was changed)")


def _rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _barrier(world: int) -> None:
    """All ranks meet after their per-shard passes (gloo: CPU-only, which is all it carries)."""
    if world == 1:
        return
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))
    dist.barrier()


def _step(name: str, removed: np.ndarray, detail: np.ndarray, started: float,
          would_remove: np.ndarray | None = None, notes: list[str] | None = None) -> StepResult:
    return StepResult(name, removed, removed if would_remove is None else would_remove, detail,
                      notes or [], time.perf_counter() - started)


def _copy_of(pool: pd.DataFrame, kept_rows: np.ndarray) -> np.ndarray:
    names = (pool["shard"].map(lambda s: Path(s).name) + "#" + pool["key"]).to_numpy()
    return np.array([f"copy of {names[k]}" for k in kept_rows], dtype=object)


def run_steps(cfg: CurateConfig, urls: list[str], pool: pd.DataFrame, embedder,
              image: np.ndarray | None, text: np.ndarray | None) -> list[StepResult]:
    n = len(pool)
    alive = np.ones(n, dtype=bool)
    steps: list[StepResult] = []

    def add(result: StepResult) -> None:
        steps.append(result)
        alive[result.removed] = False

    if cfg.captions is not None:
        from data_pipeline.curate.caption_filters import CaptionFilter

        t = time.perf_counter()
        verdicts = CaptionFilter(cfg.captions).judge(list(pool["caption"]))
        pool["caption"] = [v.caption for v in verdicts]
        flagged = np.array([v.reason is not None for v in verdicts])
        add(_step("captions", flagged & alive, np.array([v.reason for v in verdicts], dtype=object), t))

    if cfg.decontamination.on:
        from data_pipeline.curate.decontaminate import find_contamination

        t = time.perf_counter()
        found, sizes, matches = find_contamination(cfg.decontamination, pool["phash"].to_numpy(),
                                                   image, embedder, scan.tiny_images(pool))
        flagged = found != None  # noqa: E711
        notes = [f"{name}: {matches[name]:,} pool images match its {sizes[name]:,}" for name in sizes]
        detail = np.array([None if f is None else f"near copy of a {f} eval image" for f in found], dtype=object)
        add(_step("decontaminate", flagged & alive, detail, t, flagged, notes))

    if cfg.alignment.on:
        t = time.perf_counter()
        scores = alignment.clip_scores(image, text)
        pool["clip_score"] = scores
        cut = alignment.cut_for(scores, cfg.alignment.threshold, cfg.alignment.top_fraction)
        alignment.save_histogram(scores, cut, cfg.out / HISTOGRAM, "CLIP score")
        flagged = scores < cut
        how = (f"threshold {cut:.3f}" if cfg.alignment.threshold is not None else
               f"top {100 * cfg.alignment.top_fraction:g}% of the pool: cut at {cut:.3f}")
        detail = np.array([f"clip score {s:.3f} < {cut:.3f}" for s in scores], dtype=object)
        add(_step("alignment", flagged & alive, detail, t, flagged, [how, f"histogram: {HISTOGRAM}"]))

    if cfg.exact_duplicates:
        t = time.perf_counter()
        sidecars = [sidecar_path(cfg.out, scan.PASS, url, ".parquet") for url in urls]
        kept_as = exact_duplicates.find_exact_duplicates(
            sidecars, ~alive, temp_directory=cfg.out / WORK_DIR / "duckdb")
        flagged = kept_as >= 0
        detail = np.full(n, None, dtype=object)
        detail[flagged] = _copy_of(pool, kept_as[flagged])
        add(_step("exact_duplicates", flagged, detail, t))

    nd = cfg.near_duplicates

    def near_duplicate_step(name: str, find, how: str) -> None:
        """find(rows still in) -> (kept_as over those rows, note or None): one dedup step."""
        t = time.perf_counter()
        rows = np.flatnonzero(alive)
        kept_as, note = find(rows)
        flagged, detail = np.zeros(n, dtype=bool), np.full(n, None, dtype=object)
        hit = kept_as >= 0
        flagged[rows[hit]] = True
        detail[rows[hit]] = [f"{d} ({how})" for d in _copy_of(pool, rows[kept_as[hit]])]
        add(_step(name, flagged, detail, t, notes=[note] if note else []))

    if nd.by_hash:
        near_duplicate_step(
            "near_duplicates_hash",
            lambda rows: (hash_duplicates.duplicates_by_hash(pool["phash"].to_numpy()[rows], nd.hash_radius), None),
            f"phash within {nd.hash_radius} bits")
    if nd.by_pixels:
        def by_pixels(rows):
            kept_as, choice = embedding_duplicates.duplicates_by_embedding(
                scan.tiny_images(pool.iloc[rows]), nd.pixel_threshold, index=nd.index)
            return kept_as, choice.reason
        near_duplicate_step("near_duplicates_pixels", by_pixels,
                            f"16x16 pixel correlation >= {nd.pixel_threshold}")
    if nd.by_embedding and image is not None:
        def by_model(rows):
            kept_as, choice = embedding_duplicates.duplicates_by_embedding(
                image[rows], nd.embedding_threshold, index=nd.index)
            return kept_as, choice.reason
        near_duplicate_step("near_duplicates_embedding", by_model,
                            f"image cosine >= {nd.embedding_threshold}")

    if cfg.balance.on:
        t = time.perf_counter()
        rows = np.flatnonzero(alive)
        entries = balance.read_entries(cfg.balance.entries)
        removed_sub, counts = balance.balance(
            list(pool["caption"].iloc[rows]), list(pool["shard"].iloc[rows]), list(pool["key"].iloc[rows]),
            entries, cfg.balance.per_entry, cfg.balance.keep_unmatched, cfg.balance.seed)
        flagged, detail = np.zeros(n, dtype=bool), np.full(n, None, dtype=object)
        flagged[rows[removed_sub]] = True
        detail[rows[removed_sub]] = "balanced out (head entries or no entry)"
        heads = [f"{e} ({c:,})" for e, c in counts.items() if c > cfg.balance.per_entry][:5]
        notes = [f"{len(entries):,} entries, {len(counts):,} matched; t = {cfg.balance.per_entry:,}",
                 "head entries: " + (", ".join(heads) if heads else "none")]
        add(_step("balance", flagged, detail, t, notes=notes))
    return steps


def curate(cfg: CurateConfig, urls: list[str]) -> dict | None:
    """Run the stage; -> the report (rank 0) or None (other ranks)."""
    rank, world = _rank()
    check_out_folder(cfg.out, urls)
    cfg.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    mine = urls[rank::world]
    scans = scan.scan_shards(cfg.out, mine, cfg.workers)
    bootstrapped_from = None
    if cfg.bootstrap is not None and cfg.bootstrap.on:
        from data_pipeline.curate.bootstrap import filter_run_dir, train_filter_model

        if rank == 0:  # one small run; the other ranks wait for its checkpoint
            train_filter_model(cfg.bootstrap, cfg.out)
        bootstrapped_from = cfg.bootstrap.seed_shards
        cfg = dataclasses.replace(cfg, bootstrap=None, embedding=dataclasses.replace(
            cfg.embedding, checkpoint=filter_run_dir(cfg.out)))
    _barrier(world)
    embedder = None
    if cfg.embedding.on:
        from data_pipeline.curate import embeddings

        embedder = embeddings.load_embedder(cfg.embedding)
        pool_mine = scan.load_pool(cfg.out, mine)
        embeddings.embed_shards(embedder, cfg.out, mine, pool_mine)
        _barrier(world)
    if rank != 0:
        return None
    scans = scan.scan_shards(cfg.out, urls, 1)  # all reused: the per-shard counts for the report
    pool = scan.load_pool(cfg.out, urls)
    if len(pool) == 0:
        raise UserError(f"{cfg.shards}: no readable image-text pairs in {len(urls)} shards")
    image = text = None
    if embedder is not None:
        image, text = embeddings.load_embeddings(cfg.out, urls, pool)
    passes_s = time.perf_counter() - started
    steps = run_steps(cfg, urls, pool, embedder, image, text)
    pool = pool.drop(columns=["tiny"])
    frame = decisions.keep_list_frame(pool, steps)
    decisions.write_keep_list(frame, cfg.out)
    uid_file = decisions.write_datacomp_uids(frame, cfg.out)
    extra = {
        "shards": len(urls),
        "unreadable_samples": sum(s.unreadable for s in scans),
        "damaged_shards": {s.url: s.damaged for s in scans if s.damaged},
        "with_download_sha256": int(pool["download_sha256"].notna().sum()),
        "passes_seconds": round(passes_s, 1),
        "datacomp_uids": str(uid_file) if uid_file else None,
        "embedding_model": embedder.identity if embedder is not None else None,
        "bootstrapped_from": bootstrapped_from,
    }
    for result in steps:
        removed = frame[frame["removed_by"] == result.name]
        if len(removed) and cfg.grid_examples:
            sample = removed.sample(min(cfg.grid_examples, len(removed)), random_state=0)
            grids.save_grid(sample, cfg.out / GRIDS_DIR / f"{result.name}.jpg")
    if cfg.write_shards:
        kept = pool[frame["kept"].to_numpy()]
        sizes = _write_shards(kept, cfg.out / SHARDS_DIR, extra, steps, len(pool))
        extra["curated_shards"] = {"folder": str(cfg.out / SHARDS_DIR), "shards": len(sizes),
                                   "samples": sum(sizes.values())}
    data = decisions.report(len(pool), steps, extra)
    data["report_text"] = decisions.write_report(data, cfg.out)
    return data


def _write_shards(kept: pd.DataFrame, folder: Path, extra: dict, steps, pool_size: int) -> dict[str, int]:
    import json

    from data_pipeline.curate.write_shards import write_curated_shards

    if folder.is_dir():  # ours (checked): an earlier run's output, replaced whole
        for old in folder.iterdir():
            old.unlink()
    sizes = write_curated_shards(kept, folder)
    manifest = {
        "kind": "curated",
        "pairs_in": pool_size,
        "samples": sum(sizes.values()),
        "removed_per_step": {s.name: int(s.removed.sum()) for s in steps},
        "source": extra,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    return sizes
