"""Text -> image search over webdataset shards with a trained checkpoint.

    python -m eval.search --checkpoint runs/tiny_demo --shards data/demo/val \\
        "a red circle on a green background" "three small blue stars"

Embeds the shards' images once (cached under --cache, default ~/.cache/clipstream/search, keyed
by checkpoint and shards), prints the top-k matches of each query (rank, score, key, caption)
and writes one grid PNG per query into --out. --image FILE queries with an image instead of a
sentence (nearest neighbours in the same embedding space).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from PIL import Image

from data_pipeline.errors import UserError, run_main
from eval.config import InferenceConfig, add_precision_flag
from eval.features import encode_texts
from eval.image_index import DEFAULT_CACHE, fetch_images, load_or_build_index
from eval.plots import plot_search_grid
from eval.shard_images import shard_urls
from training.model.trained import TrainedModel, load_trained_model, resolve_checkpoint
from training.data.transforms import build_eval_transform


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("queries", nargs="*", help="sentences to search for")
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint .pt or run folder")
    p.add_argument("--shards", required=True, help="webdataset shards: folder, pattern or URL")
    p.add_argument("--image", type=Path, action="append", default=[], help="query by image")
    p.add_argument("--top-k", type=int, default=9)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="index cache folder")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--out", type=Path, default=Path("search_results"), help="grid PNG folder")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    add_precision_flag(p)
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "query"


def encode_queries(trained: TrainedModel, texts: list[str], images: list[Path],
                   cfg: InferenceConfig) -> tuple[list[str], torch.Tensor]:
    """-> (labels, normalised query features [Q, D]): sentences first, then images."""
    parts, labels = [], []
    if texts:
        parts.append(encode_texts(trained.model, trained.tokenizer, texts, cfg))
        labels += texts
    if images:
        transform = build_eval_transform(trained.image_size)
        pixels = []
        for path in images:
            if not path.is_file():
                raise UserError(f"--image {path}: no such file")
            with Image.open(path) as image:
                pixels.append(transform(image.convert("RGB")))
        with torch.no_grad():
            feats = trained.model.encode_image(torch.stack(pixels).to(cfg.device), normalize=True)
        parts.append(feats.float().cpu())
        labels += [f"image: {path.name}" for path in images]
    return labels, torch.cat(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.queries and not args.image:
        raise UserError("give at least one query sentence (or --image FILE)")
    if args.top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {args.top_k}")
    checkpoint = resolve_checkpoint(args.checkpoint)
    shard_urls(args.shards, "--shards")  # a wrong path fails before the model loads
    cfg = InferenceConfig(batch_size=args.batch_size, workers=args.workers,
                          precision=args.precision, device=args.device)
    trained = load_trained_model(checkpoint, cfg.device)

    index, cache_file, cached = load_or_build_index(
        trained, args.shards, cfg, None if args.no_cache else args.cache
    )
    where = "embedded" if cache_file is None else f"embedded, cached in {cache_file}"
    if cached:
        where = f"cache {cache_file}"
    print(f"{len(index.keys)} images from {args.shards} ({where}); checkpoint step {trained.step}")

    labels, queries = encode_queries(trained, list(args.queries), list(args.image), cfg)
    scores, positions = index.search(queries, args.top_k)
    for query, row_scores, row_positions in zip(labels, scores.tolist(), positions.tolist()):
        print(f'\nquery: "{query}"')
        for rank, (score, position) in enumerate(zip(row_scores, row_positions), start=1):
            print(f"  {rank:2d}  {score:.4f}  {index.keys[position]}  {index.captions[position]}")
        found = fetch_images(index, row_positions)
        shown = [p for p in row_positions if p in found]
        png = plot_search_grid(
            query, [found[p] for p in shown], [row_scores[row_positions.index(p)] for p in shown],
            [index.keys[p] for p in shown], args.out / f"{_slug(query)}.png",
        )
        print(f"  grid: {png}")
    return 0


if __name__ == "__main__":
    run_main(main)
