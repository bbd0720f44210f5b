"""Download image-text pairs into webdataset shards with img2dataset (`make shards`).

Two modes:
  python -m data_pipeline.shards --output data/shards --url-list pairs.parquet [options]
      Shards go straight into OUTPUT: N.tar (KEY.jpg, KEY.txt, KEY.json per sample),
      N.parquet and N_stats.json from img2dataset, plus sizes.json and manifest.json.
  python -m data_pipeline.shards --output data/shards [--num-samples 20000 --seed 0]
      No URL list: render the offline demo corpus (coloured shapes with captions), serve it on
      127.0.0.1 and download it with img2dataset; writes OUTPUT/{train,val,heldout}/ shard
      folders and OUTPUT/corpus.json. About 20k pairs take a few minutes on 2 CPU cores.

Reruns: OUTPUT must be new, empty, or (with --incremental) hold shards of the same options;
--incremental downloads only unfinished shards and returns at once when all are done. A folder
holding anything else is refused and never modified.

Distributed downloads: `--distributor pyspark` hands shards to Spark tasks (pip install
'clipstream[spark]', Java 17+). --spark-master spark://host:7077 (yarn, k8s://..., local[N]) runs
them on that cluster, sized by --spark-executor-memory/-cores and --spark-cores-max; without it
the master spark-submit set, an active SparkSession, or local[PROCESSES]. On a cluster,
--url-list and --output must be paths every executor can reach (a shared filesystem, or fsspec
URLs such as s3://bucket/pairs/ and s3://bucket/shards).

Object storage: --output s3://bucket/prefix writes shards, sizes.json and manifest.json into
the bucket (img2dataset's log stays local, in the temp folder); for an S3-compatible store
(MinIO, Ceph, ...) set AWS_ENDPOINT_URL, which img2dataset's worker processes honour too.

Exit status: 0 done, 2 bad input or nothing downloaded (one `error:` line), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
from contextlib import nullcontext
from typing import Sequence

from data_pipeline.demo_build import build_demo
from data_pipeline.demo_corpus import DemoConfig
from data_pipeline.errors import UserError, run_main
from data_pipeline.shard_build import build_shards
from data_pipeline.shard_config import (
    DISTRIBUTORS,
    INPUT_FORMATS,
    RESIZE_MODES,
    ShardConfig,
    infer_input_format,
)
from data_pipeline.spark_session import SparkConfig, spark_session

# The demo's defaults differ from a web crawl's: tiny images so a small CLIP trains on a CPU, and
# shards small enough that the 20k-pair train split spreads over several data-loader workers.
DEMO_IMAGE_SIZE = 64
DEMO_SAMPLES_PER_SHARD = 2020  # the default 20,000 pairs + 200 planted failures: exactly 10 train shards
URL_LIST_IMAGE_SIZE = 256
URL_LIST_SAMPLES_PER_SHARD = 10_000


def _column_names(values: Sequence[str]) -> tuple[str, ...]:
    """Accept both `--extra-columns a b` and `--extra-columns a,b`."""
    return tuple(name for value in values for name in value.split(",") if name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.shards",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--output",
        default="data/shards",
        help="shard folder: local path or fsspec URL (default: %(default)s)",
    )
    source = parser.add_argument_group("URL list (without --url-list: the offline demo corpus)")
    source.add_argument("--url-list", help="file or folder of files with one URL and caption per row")
    source.add_argument(
        "--input-format",
        choices=[f for f in INPUT_FORMATS if not f.startswith("txt")],
        help="format of the URL list (default: from its extension)",
    )
    source.add_argument(
        "--url-col", default="url", help="column holding the image URL (default: %(default)s)"
    )
    source.add_argument(
        "--caption-col", default="caption", help="column holding the caption (default: %(default)s)"
    )
    source.add_argument(
        "--extra-columns",
        nargs="+",
        default=[],
        metavar="COL",
        help="more columns to copy into each sample's .json and the parquet",
    )
    demo = parser.add_argument_group("demo corpus (only without --url-list)")
    demo.add_argument(
        "--num-samples",
        type=int,
        default=DemoConfig.num_samples,
        help="training pairs to generate (default: %(default)s); val and heldout get 5%% each, at least 64",
    )
    demo.add_argument(
        "--seed", type=int, default=DemoConfig.seed, help="fixes every row and pixel (default: %(default)s)"
    )
    demo.add_argument(
        "--noise", action="store_true",
        help="plant web-like noise in train (duplicates, foreign/boilerplate/mismatched captions, "
             "eval copies), the truth in OUTPUT/noise.json: a pool to curate",
    )
    demo.add_argument(
        "--texture", action="store_true",
        help="draw images over a random colour field as a --noise pool does, without its noise "
             "(a trusted seed set for curating such a pool)",
    )
    demo.add_argument(
        "--render-size",
        type=int,
        default=DemoConfig.render_size,
        help="side of the rendered source images in px (default: %(default)s)",
    )
    images = parser.add_argument_group("images and shards")
    images.add_argument(
        "--image-size",
        type=int,
        help=f"side of the stored images (default: {URL_LIST_IMAGE_SIZE}, demo {DEMO_IMAGE_SIZE})",
    )
    images.add_argument(
        "--resize-mode",
        choices=RESIZE_MODES,
        default="border",
        help="img2dataset resize mode (default: %(default)s)",
    )
    images.add_argument(
        "--encode-quality", type=int, default=95, help="JPEG quality 0..100 (default: %(default)s)"
    )
    images.add_argument(
        "--min-image-size", type=int, default=0, help="drop images whose shorter side is smaller"
    )
    images.add_argument(
        "--samples-per-shard",
        type=int,
        help=f"URLs per shard (default: {URL_LIST_SAMPLES_PER_SHARD}, demo {DEMO_SAMPLES_PER_SHARD})",
    )
    run = parser.add_argument_group("download")
    run.add_argument(
        "--processes",
        type=int,
        default=ShardConfig.processes,
        help="download processes (default: CPU count, %(default)s)",
    )
    run.add_argument(
        "--threads",
        type=int,
        default=ShardConfig.threads,
        help="download threads per process (default: %(default)s)",
    )
    run.add_argument(
        "--retries", type=int, default=0, help="extra attempts per failed URL (default: %(default)s)"
    )
    run.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default: %(default)s)")
    run.add_argument(
        "--incremental", action="store_true", help="keep finished shards in OUTPUT, download the rest"
    )
    run.add_argument(
        "--distributor",
        choices=DISTRIBUTORS,
        default="multiprocessing",
        help="multiprocessing on this machine, or pyspark (see below) (default: %(default)s)",
    )
    run.add_argument(
        "--wandb", action="store_true", help="log download speed and failures to Weights & Biases"
    )
    run.add_argument(
        "--wandb-project", default=ShardConfig.wandb_project, help="W&B project (default: %(default)s)"
    )
    spark = parser.add_argument_group("Spark (only with --distributor pyspark)")
    spark.add_argument(
        "--spark-master", metavar="URL",
        help="spark://host:7077, yarn, k8s://..., local[N] (default: spark-submit's, else local[PROCESSES])",
    )
    spark.add_argument("--spark-executor-memory", metavar="SIZE", help="per executor, e.g. 4g")
    spark.add_argument("--spark-executor-cores", type=int, metavar="N", help="cores per executor")
    spark.add_argument(
        "--spark-cores-max", type=int, metavar="N",
        help="cores this run takes from a standalone cluster (default: all free ones)",
    )
    spark.add_argument(
        "--spark-start-timeout", type=float, default=SparkConfig.start_timeout_s, metavar="S",
        help="seconds a spark:// master may take to start the first executor (default: %(default)s)",
    )
    return parser


def spark_config_from_args(args: argparse.Namespace) -> SparkConfig:
    spark = SparkConfig(
        master=args.spark_master,
        executor_memory=args.spark_executor_memory,
        executor_cores=args.spark_executor_cores,
        cores_max=args.spark_cores_max,
        start_timeout_s=args.spark_start_timeout,
    )
    if args.distributor != "pyspark" and not spark.is_default():
        raise UserError("the --spark-* options need --distributor pyspark")
    return spark


def config_from_args(args: argparse.Namespace) -> ShardConfig:
    demo = args.url_list is None
    input_format = args.input_format
    if not demo and input_format is None:
        input_format = infer_input_format(args.url_list)
        if input_format is None:
            raise UserError(f"cannot tell the format of {args.url_list} from its name; pass --input-format")
    return ShardConfig(
        output=args.output,
        url_list=None if demo else os.fspath(args.url_list),
        input_format=input_format or "parquet",
        url_col=args.url_col,
        caption_col=args.caption_col,
        extra_columns=_column_names(args.extra_columns),
        image_size=args.image_size or (DEMO_IMAGE_SIZE if demo else URL_LIST_IMAGE_SIZE),
        resize_mode=args.resize_mode,
        encode_quality=args.encode_quality,
        min_image_size=args.min_image_size,
        processes=args.processes,
        threads=args.threads,
        samples_per_shard=args.samples_per_shard
        or (DEMO_SAMPLES_PER_SHARD if demo else URL_LIST_SAMPLES_PER_SHARD),
        retries=args.retries,
        timeout=args.timeout,
        incremental=args.incremental,
        distributor=args.distributor,
        wandb=args.wandb,
        wandb_project=args.wandb_project,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    spark = spark_config_from_args(args)
    # One session around every split (the demo has three): img2dataset joins the active one.
    with spark_session(spark, config.processes) if config.distributor == "pyspark" else nullcontext():
        if config.url_list is None:
            build_demo(
                DemoConfig(num_samples=args.num_samples, seed=args.seed, render_size=args.render_size,
                           noise=args.noise, texture=args.texture or None), config
            )
        else:
            build_shards(config, config.url_list)
    return 0


if __name__ == "__main__":  # img2dataset's spawned workers re-import this module: keep the guard
    run_main(main, interrupted_hint="finished shards are kept; rerun with --incremental to resume")
