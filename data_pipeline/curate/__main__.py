"""python -m data_pipeline.curate --shards DIR --out DIR [options]   (or `make curate`)

Scan a shard pool, filter it, and write what was kept: OUT/keep_list.parquet (every pair, kept
or why not), OUT/shards/ (the kept pairs as new shards), OUT/report.txt and .json, OUT/grids/
(what each step removed). The input shards are never modified. Examples:

    # dedup + caption filters only (no model needed)
    python -m data_pipeline.curate --shards data/demo/train --out data/curated
    # with a CLIP: embedding dedup, DataComp's top-30% CLIP-score filter, decontamination
    python -m data_pipeline.curate --shards data/demo/train --out data/curated \\
        --checkpoint runs/tiny_demo --clip-score-top 0.3 --decontaminate demo=data/demo
    # under torchrun each rank scans and embeds its slice of the shards
    torchrun --nproc_per_node 8 -m data_pipeline.curate --shards 's3://b/{00000..09999}.tar' ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_pipeline.curate.config import (AlignmentConfig, BalanceConfig, CurateConfig, DecontaminationConfig,
                                         EmbeddingConfig, NearDuplicateConfig)
from data_pipeline.errors import UserError, run_main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.curate",
                                description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="the pool: a shard folder, brace pattern or a::b")
    p.add_argument("--out", required=True, type=Path, help="new folder, or an earlier curate output")
    p.add_argument("--workers", type=int, default=2, help="processes for the scan pass")
    steps = p.add_argument_group("steps (all on unless said)")
    steps.add_argument("--no-exact-dedup", action="store_true")
    steps.add_argument("--no-near-dedup", action="store_true", help="neither hash nor embedding")
    steps.add_argument("--no-hash-dedup", action="store_true",
                       help="no perceptual-hash dedup or decontamination (colour-blind: for photos, "
                            "not flat synthetic renders like the demo's)")
    steps.add_argument("--no-model-dedup", action="store_true",
                       help="no dedup or decontamination by the model's image embeddings (they are "
                            "semantic: two renders of one scene match, as in the demo corpus)")
    steps.add_argument("--pixel-dedup", action="store_true",
                       help="also dedup and decontaminate by 16x16 pixel correlation (colour-aware)")
    steps.add_argument("--pixel-threshold", type=float, default=0.95)
    steps.add_argument("--hash-radius", type=int, default=6, help="perceptual-hash Hamming radius")
    steps.add_argument("--dedup-threshold", type=float, default=0.97,
                       help="image-embedding cosine for near duplicates (with a model)")
    steps.add_argument("--index", default="auto", help="faiss index: auto | flat | ivfpq")
    steps.add_argument("--no-caption-filter", action="store_true")
    steps.add_argument("--min-words", type=int, default=2)
    steps.add_argument("--max-words", type=int, default=80)
    steps.add_argument("--languages", default="en",
                       help="ISO 639-1 codes to keep, comma-separated; 'any' = no language id")
    steps.add_argument("--decontaminate", action="append", default=[], metavar="KIND=PATH",
                       help="eval set to remove near copies of: demo=, cifar10=, cifar100=, "
                            "imagenet=, imagefolder= (repeatable)")
    steps.add_argument("--clip-score-threshold", type=float, help="keep CLIP score >= this")
    steps.add_argument("--clip-score-top", type=float, help="keep the top fraction by CLIP score")
    steps.add_argument("--balance-entries", type=Path, help="MetaCLIP metadata: one entry per line")
    steps.add_argument("--balance-per-entry", type=int, default=20_000, help="MetaCLIP's t")
    steps.add_argument("--balance-keep-unmatched", action="store_true")
    model = p.add_argument_group("the embedding model (for alignment, embedding dedup)")
    model.add_argument("--checkpoint", type=Path, help="one of our checkpoints or run folders")
    model.add_argument("--pretrained", type=Path, help="an OpenAI/OpenCLIP checkpoint file")
    model.add_argument("--model", help="architecture of --pretrained, e.g. vit_b32_quickgelu")
    model.add_argument("--bpe", type=Path, help="CLIP's BPE vocabulary, for --pretrained")
    model.add_argument("--bootstrap", metavar="SEED_SHARDS",
                       help="no pretrained model: train a filter CLIP on these trusted shards first")
    model.add_argument("--bootstrap-config", type=Path, default=Path("configs/tiny_demo.toml"),
                       help="run TOML of the filter model")
    model.add_argument("--bootstrap-set", action="append", default=[], metavar="KEY=VALUE",
                       help="override for the filter model's run (repeatable), e.g. train.epochs=2")
    model.add_argument("--embed-batch-size", type=int, default=256)
    model.add_argument("--precision", default="auto")
    out = p.add_argument_group("output")
    out.add_argument("--no-shards", action="store_true", help="write the keep-list only")
    out.add_argument("--grid-examples", type=int, default=16)
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> CurateConfig:
    from data_pipeline.curate.caption_filters import CaptionFilterConfig

    captions = None
    if not args.no_caption_filter:
        languages = None if args.languages.strip().lower() == "any" else tuple(
            code.strip().lower() for code in args.languages.split(",") if code.strip())
        try:
            captions = CaptionFilterConfig(min_words=args.min_words, max_words=args.max_words,
                                           languages=languages)
        except ValueError as exn:
            raise UserError(f"caption filter: {exn}") from None
    sets = {}
    for item in args.decontaminate:
        kind, sep, path = item.partition("=")
        if not sep or not path:
            raise UserError(f"--decontaminate {item!r}: expected KIND=PATH, e.g. demo=data/demo")
        sets[kind.strip()] = Path(path)
    embedding = EmbeddingConfig(checkpoint=args.checkpoint, pretrained=args.pretrained,
                                model_name=args.model, bpe=args.bpe,
                                batch_size=args.embed_batch_size, precision=args.precision)
    from data_pipeline.curate.bootstrap import BootstrapConfig

    bootstrap = BootstrapConfig(seed_shards=args.bootstrap, config=args.bootstrap_config,
                                overrides=tuple(args.bootstrap_set))
    has_model = embedding.on or bootstrap.on
    return CurateConfig(
        shards=args.shards, bootstrap=bootstrap, out=args.out, workers=args.workers,
        exact_duplicates=not args.no_exact_dedup, captions=captions,
        near_duplicates=NearDuplicateConfig(by_hash=not (args.no_near_dedup or args.no_hash_dedup),
                                            hash_radius=args.hash_radius,
                                            by_pixels=args.pixel_dedup and not args.no_near_dedup,
                                            pixel_threshold=args.pixel_threshold,
                                            by_embedding=has_model and not (args.no_near_dedup
                                                                            or args.no_model_dedup),
                                            embedding_threshold=args.dedup_threshold, index=args.index),
        embedding=embedding,
        alignment=AlignmentConfig(on=args.clip_score_threshold is not None or args.clip_score_top is not None,
                                  threshold=args.clip_score_threshold, top_fraction=args.clip_score_top),
        balance=BalanceConfig(on=args.balance_entries is not None, entries=args.balance_entries,
                              per_entry=args.balance_per_entry, keep_unmatched=args.balance_keep_unmatched),
        decontamination=DecontaminationConfig(sets=sets, by_hash=not args.no_hash_dedup,
                                              by_pixels=args.pixel_dedup, by_model=not args.no_model_dedup,
                                              pixel_threshold=args.pixel_threshold),
        write_shards=not args.no_shards, grid_examples=args.grid_examples,
    )


def check_inputs(cfg: CurateConfig) -> None:
    from data_pipeline.curate.decontaminate import eval_dataset

    if cfg.embedding.checkpoint is not None:
        from training.model.trained import resolve_checkpoint

        resolve_checkpoint(Path(cfg.embedding.checkpoint))
    if cfg.embedding.pretrained is not None and not Path(cfg.embedding.pretrained).is_file():
        raise UserError(f"--pretrained {cfg.embedding.pretrained}: no such file")
    for kind, path in cfg.decontamination.sets.items():
        eval_dataset(kind, Path(path), 32)  # the eval readers' own layout checks


def main(argv: list[str] | None = None) -> int:
    from data_pipeline.curate.run import curate
    from eval.shard_images import shard_urls

    args = parse_args(argv)
    cfg = build_config(args)
    urls = shard_urls(cfg.shards, "--shards")
    check_inputs(cfg)  # every path problem surfaces before anything is read or written
    report = curate(cfg, urls)
    if report is not None:
        print(report["report_text"])
        print(f"keep-list: {cfg.out / 'keep_list.parquet'}"
              + (f"; curated shards: {cfg.out / 'shards'}" if cfg.write_shards else ""))
    return 0


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
