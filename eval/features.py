"""Batched, no-grad encoding of images and texts, and prompt-ensembled class embeddings.

Datasets handed to `encode_images` yield (image tensor, payload) pairs; the payload (a label,
captions, metadata) travels with its image through the loader, so the order in which workers
deliver samples never matters. Features come back L2-normalised, in fp32, on the CPU.
"""

from __future__ import annotations

from itertools import islice
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm import tqdm

from eval.config import InferenceConfig
from eval.sharding import gather_encoded, rank_slice
from training.parallel.collectives import world_info
from training.model import CLIP
from training.parallel.precision import Precision
from training.text.tokenizer import Tokenizer


def autocast(cfg: InferenceConfig):
    """The training code's precision helper, so eval and training agree on what bf16 means."""
    device_type = "cuda" if str(cfg.device).startswith("cuda") else "cpu"
    return Precision(cfg.precision, device_type).autocast()


def collate_images(batch: list[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, list[Any]]:
    return torch.stack([image for image, _ in batch]), [payload for _, payload in batch]


@torch.no_grad()
def encode_images(
    model: CLIP, dataset: Dataset, cfg: InferenceConfig, desc: str = "images"
) -> tuple[torch.Tensor, list[Any]]:
    """All images of `dataset` (at most cfg.max_images) -> (features [N, D], payloads).
    Under torchrun each rank encodes its slice and every rank gets all of them (eval.sharding);
    max_images then caps each rank at its share, so a capped sharded run sees another subset.
    Only with cfg.sharded: callers that already give each rank its own shards (curation's
    embedding pass) encode just what they are handed."""
    world = world_info()[1] if cfg.sharded else 1
    cap = None if cfg.max_images is None else -(-cfg.max_images // world)
    loader = DataLoader(
        rank_slice(dataset) if cfg.sharded else dataset,
        batch_size=cfg.batch_size,
        num_workers=cfg.workers,
        collate_fn=collate_images,
        shuffle=False,
        pin_memory=str(cfg.device).startswith("cuda"),
    )
    batches = loader
    if cap is not None:
        batches = islice(loader, -(-cap // cfg.batch_size))
    chunks, payloads = [], []
    total = len(dataset) // world if not isinstance(dataset, IterableDataset) else None
    for images, batch_payloads in tqdm(batches, desc=desc, unit="batch", disable=None, leave=False,
                                       total=None if total is None else -(-total // cfg.batch_size)):
        with autocast(cfg):
            features = model.encode_image(images.to(cfg.device, non_blocking=True), normalize=True)
        chunks.append(features.float().cpu())
        payloads.extend(batch_payloads)
    features = torch.cat(chunks)[:cap] if chunks else None
    if cfg.sharded:
        features, payloads = gather_encoded(features, payloads[:cap])
    if features is None:
        raise ValueError(f"no {desc} to encode")
    if cfg.max_images is not None:
        features, payloads = features[: cfg.max_images], payloads[: cfg.max_images]
    return features, payloads


@torch.no_grad()
def encode_texts(
    model: CLIP, tokenizer: Tokenizer, texts: Sequence[str], cfg: InferenceConfig
) -> torch.Tensor:
    """texts -> L2-normalised features [len(texts), D] (fp32, CPU)."""
    chunks = []
    for start in range(0, len(texts), cfg.batch_size):
        tokens = tokenizer(list(texts[start : start + cfg.batch_size])).to(cfg.device)
        with autocast(cfg):
            chunks.append(model.encode_text(tokens, normalize=True).float().cpu())
    if not chunks:
        raise ValueError("no texts to encode")
    return torch.cat(chunks)


def class_embeddings(
    model: CLIP, tokenizer: Tokenizer, classnames: Sequence[str], templates: Sequence[str],
    cfg: InferenceConfig,
) -> torch.Tensor:
    """The zero-shot classifier [C, D]: per class, the mean of its L2-normalised prompt
    embeddings, renormalised (CLIP's prompt ensembling, done in embedding space)."""
    if not classnames or not templates:
        raise ValueError("need at least one class name and one template")
    prompts = [template.format(name) for name in classnames for template in templates]
    features = encode_texts(model, tokenizer, prompts, cfg)
    per_class = features.view(len(classnames), len(templates), -1).mean(dim=1)
    return torch.nn.functional.normalize(per_class, dim=-1)
