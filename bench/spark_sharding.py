"""Sharding throughput: `--distributor pyspark` on a standalone Spark cluster vs `multiprocessing`,
the same URL list, the same cores, in one run.

N web-sized JPEGs (varied sizes around 400x300, smooth gradients plus noise so they compress like
photos) are served from a loopback HTTP server; `python -m data_pipeline.shards` shards the list
into 256 px webdataset shards twice per round, once per distributor, alternating so that load from
other jobs falls on both. Multiprocessing gets --processes CORES; Spark gets a local master and
one worker with CORES cores (tests/spark_cluster.py), --spark-cores-max CORES. Reported per run:
images/s over img2dataset's download phase (the manifest's figure) and over the whole command
(Python start, SparkSession and executors included), per core, and Spark / multiprocessing.

    .venv/bin/python -m bench.spark_sharding                 # 12,000 URLs, 2 rounds, ~8 min on 2 cores
    .venv/bin/python -m bench.spark_sharding --urls 1000 --rounds 1   # smoke test

-> bench/spark_sharding.md and .json. Work files in data/bench/spark_sharding (gitignored).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = REPO / "data" / "bench" / "spark_sharding"
# The local cluster helper lives with the tests that also use it; one implementation of it.
sys.path.insert(0, str(REPO / "tests"))


def write_images(folder: Path, count: int) -> list[str]:
    """`count` photo-like JPEGs (reused when present); returns their file names."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        name = f"{i:06d}.jpg"
        names.append(name)
        if (folder / name).is_file():
            continue
        rng = np.random.default_rng(i)
        width, height = 320 + 40 * (i % 5), 240 + 30 * (i % 4)
        y, x = np.mgrid[0:height, 0:width]
        base = rng.uniform(0, 255, 3)
        slope = rng.uniform(-0.5, 0.5, (2, 3))
        pixels = base + x[..., None] * slope[0] + y[..., None] * slope[1] + rng.normal(0, 12, (height, width, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        (folder / name).write_bytes(buffer.getvalue())
    return names


def shard_once(url_list: Path, output: Path, args: argparse.Namespace, extra: list[str],
               env: dict[str, str] | None) -> dict:
    shutil.rmtree(output, ignore_errors=True)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "data_pipeline.shards", "--url-list", str(url_list), "--output", str(output),
         "--image-size", "256", "--samples-per-shard", str(args.samples_per_shard),
         "--processes", str(args.cores), "--threads", str(args.threads), "--timeout", "10", *extra],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=1800,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"sharding failed:\n{done.stdout}\n{done.stderr}")
    manifest = json.loads((output / "manifest.json").read_text())
    images = manifest["totals"]["success"]
    # Each shard's own download time (img2dataset's N_stats.json): the speed of one busy task,
    # free of start-up, whichever distributor ran it.
    stats = [json.loads(p.read_text()) for p in output.glob("*_stats.json")]
    return {
        "images": images,
        "task_images_per_s": round(sum(x["successes"] for x in stats) / sum(x["duration"] for x in stats), 1),
        "download_s": manifest["run"]["elapsed_s"],
        "wall_s": round(wall, 1),
        "images_per_s": round(images / manifest["run"]["elapsed_s"], 1),
        "images_per_s_wall": round(images / wall, 1),
        "sizes": json.loads((output / "sizes.json").read_text()),
    }


def run(args: argparse.Namespace) -> dict:
    from data_pipeline.loopback_server import serve_folder
    from spark_cluster import LocalSpark, missing_reason

    reason = missing_reason()
    if reason:
        raise SystemExit(f"cannot run the Spark side: {reason}")
    from bench.machine import describe, load_average

    names = write_images(WORK / "images", args.urls)
    runs: dict[str, list[dict]] = {"multiprocessing": [], "pyspark": []}
    loads = [load_average()]
    with serve_folder(WORK / "images") as base_url:
        url_list = WORK / "pairs.csv"
        with open(url_list, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["url", "caption"])
            writer.writerows((f"{base_url}/{name}", f"a photo numbered {i}") for i, name in enumerate(names))
        for round_ in range(args.rounds):
            print(f"round {round_ + 1}: multiprocessing ...", flush=True)
            runs["multiprocessing"].append(shard_once(url_list, WORK / "mp", args, [], None))
            print(f"  {runs['multiprocessing'][-1]['images_per_s']} images/s; pyspark ...", flush=True)
            # A fresh cluster per round, stopped before the next multiprocessing run.
            with LocalSpark(WORK / "cluster", cores=args.cores, worker_memory="2g") as cluster:
                runs["pyspark"].append(shard_once(
                    url_list, WORK / "spark", args,
                    ["--distributor", "pyspark", "--spark-master", cluster.master_url,
                     "--spark-executor-memory", "1g", "--spark-cores-max", str(args.cores)],
                    cluster.env))
            print(f"  {runs['pyspark'][-1]['images_per_s']} images/s", flush=True)
            loads.append(load_average())
    reference = runs["multiprocessing"][0]["sizes"]
    for side in runs.values():
        for r in side:
            if r.pop("sizes") != reference:
                raise RuntimeError("the runs produced different shards (sizes.json differs)")

    def summary(side: list[dict]) -> dict:
        rate = statistics.median(r["images_per_s"] for r in side)
        wall = statistics.median(r["images_per_s_wall"] for r in side)
        task = round(statistics.median(r["task_images_per_s"] for r in side), 1)
        rate = round(rate, 1)
        wall = round(wall, 1)
        return {"task_images_per_s": task, "images_per_s": rate, "images_per_s_per_core": round(rate / args.cores, 1),
                "images_per_s_wall": wall, "images_per_s_wall_per_core": round(wall / args.cores, 1)}

    mp, spark = summary(runs["multiprocessing"]), summary(runs["pyspark"])
    return {
        "machine": describe(), "load_average_1min": loads, "urls": args.urls,
        "cores": args.cores, "threads": args.threads, "samples_per_shard": args.samples_per_shard,
        "runs": runs, "multiprocessing": mp, "pyspark": spark,
        "ratio_pyspark_over_multiprocessing": round(spark["images_per_s"] / mp["images_per_s"], 2),
        "ratio_wall": round(spark["images_per_s_wall"] / mp["images_per_s_wall"], 2),
    }


def to_markdown(r: dict) -> str:
    from bench.machine import one_line

    lines = [
        "# Sharding throughput: Spark (standalone) vs multiprocessing", "",
        f"Machine: {one_line(r['machine'])}; 1-min load average {r['load_average_1min']} "
        "(start, after each round; the cores are shared with other jobs).",
        f"{r['urls']:,} URLs of ~400x300 JPEGs from a loopback server, resized to 256 px, "
        f"{r['samples_per_shard']} per shard, {r['threads']} threads per process/task, {r['cores']} cores "
        "either way: multiprocessing --processes "
        f"{r['cores']}; Spark: local master + one worker with {r['cores']} cores, 1g executors. "
        f"{len(r['runs']['pyspark'])} alternating rounds, medians.", "",
        "| distributor | images/s per busy task (shard stats) | images/s (download) | per core | "
        "images/s (whole command) | per core |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("multiprocessing", "pyspark"):
        s = r[name]
        lines.append(f"| {name} | {s['task_images_per_s']} | {s['images_per_s']} | {s['images_per_s_per_core']} | "
                     f"{s['images_per_s_wall']} | {s['images_per_s_wall_per_core']} |")
    lines += ["", f"Spark / multiprocessing: **{r['ratio_pyspark_over_multiprocessing']}x** over the "
              f"download phase, {r['ratio_wall']}x over the whole command.", "",
              "Per run (download s, whole command s):", ""]
    for name in ("multiprocessing", "pyspark"):
        runs = ", ".join(f"{x['download_s']} / {x['wall_s']}" for x in r["runs"][name])
        lines.append(f"- {name}: {runs}")
    startup = {name: statistics.median(x["wall_s"] - x["download_s"] for x in r["runs"][name])
               for name in ("multiprocessing", "pyspark")}
    lines += ["", f"Outside the download phase (whole command minus download, median): multiprocessing "
              f"{startup['multiprocessing']:.0f} s, pyspark {startup['pyspark']:.0f} s (the SparkSession, "
              "the executors' JVMs, the manifest). Spread between rounds is large where the cores are "
              "shared; compare figures from one run only."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--urls", type=int, default=12000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--out", default=str(BENCH / "spark_sharding"))
    args = parser.parse_args(argv)
    results = run(args)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(to_markdown(results))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
