"""The embedding pass: image and text embeddings of every scanned pair, one sidecar per shard.

Any CLIP this project can load embeds the pool: one of our checkpoints, or an OpenAI/OpenCLIP
file through the importer. Batched, no-grad, in the precision the hardware does natively
(`eval.features`, the same code eval uses). Each shard's embeddings go to an .npz sidecar
(float16: half the disk, and cosines at 1e-3 are all the filters need) named by the shard and
keyed by the model's identity, so an interrupted pass recomputes only unfinished shards and a
different model gets fresh sidecars. Under torchrun each rank embeds its own slice of shards.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from data_pipeline.curate.config import EmbeddingConfig
from data_pipeline.curate.sidecars import atomic_write_bytes, identity_digest, shard_identity, sidecar_path
from data_pipeline.errors import UserError
from data_pipeline.shard_format import BadSample, RawSample, decode_caption

PASS = "embed"
EMBED_VERSION = 1


@dataclass
class Embedder:
    model: object  # training.model.CLIP
    tokenizer: object
    image_size: int
    identity: dict
    inference: object  # eval.config.InferenceConfig


def _file_identity(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def load_embedder(cfg: EmbeddingConfig) -> Embedder:
    """The model named by cfg; a missing or mismatched checkpoint is one UserError line."""
    from eval.config import InferenceConfig
    from training.model.trained import load_trained_model, resolve_checkpoint

    import torch

    # Under torchrun each rank embeds on its own GPU (cuda:LOCAL_RANK), not all on cuda:0.
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    infer = InferenceConfig(batch_size=cfg.batch_size, workers=cfg.workers, precision=cfg.precision,
                            device=device)
    if cfg.checkpoint is not None:
        path = resolve_checkpoint(Path(cfg.checkpoint))
        try:
            trained = load_trained_model(path, device=infer.device)
        except (KeyError, RuntimeError, ValueError) as exn:
            raise UserError(f"--checkpoint {path}: not a checkpoint this project can load "
                            f"({type(exn).__name__}: {str(exn)[:120]})") from None
    else:
        from training.interop.import_checkpoint import check_model_name, import_pretrained

        path = Path(cfg.pretrained)
        if not path.is_file():
            raise UserError(f"--pretrained {path}: no such file")
        check_model_name(cfg.model_name)
        trained = import_pretrained(path, model_name=cfg.model_name, bpe_path=cfg.bpe,
                                    device=infer.device)
    identity = {"model": _file_identity(path), "model_name": cfg.model_name,
                "precision": infer.precision, "image_size": trained.image_size}
    return Embedder(trained.model, trained.tokenizer, trained.image_size, identity, infer)


def _key_if_captioned(raw: RawSample) -> str | None:
    """The payload for ShardImages: the key of a sample the scan pass also kept (it has a
    caption that decodes), so images and scanned rows pair up by key."""
    try:
        decode_caption(raw)
    except BadSample:
        return None
    return raw["__key__"]


def _identity(embedder: Embedder, url: str) -> dict:
    return {"pass": PASS, "version": EMBED_VERSION, **embedder.identity, **shard_identity(url)}


def embed_shard(embedder: Embedder, out: Path, url: str, rows: pd.DataFrame) -> bool:
    """Embed one shard's scanned rows unless a valid sidecar exists; True if it computed."""
    from eval.features import encode_images, encode_texts
    from eval.shard_images import ShardImages

    path = sidecar_path(out, PASS, url, ".npz")
    digest = identity_digest(_identity(embedder, url))
    if path.is_file():
        with np.load(path) as stored:
            if str(stored["identity"]) == digest:
                return False
    keys = list(rows["key"])
    if keys:
        dataset = ShardImages([url], embedder.image_size, _key_if_captioned)
        image, image_keys = encode_images(embedder.model, dataset, embedder.inference, desc="embed")
        position = {k: i for i, k in enumerate(image_keys)}
        missing = [k for k in keys if k not in position]
        if missing:  # the scan read this shard differently: it changed under us
            raise UserError(f"{url}: {len(missing)} scanned samples (e.g. {missing[0]}) are not "
                            "in the shard any more; it changed since the scan: rerun with a fresh --out")
        image = image[[position[k] for k in keys]].numpy()
        text = encode_texts(embedder.model, embedder.tokenizer, list(rows["caption"]),
                            embedder.inference).numpy()
    else:
        dim = embedder.model.embed_dim if hasattr(embedder.model, "embed_dim") else 0
        image = text = np.zeros((0, dim), np.float32)
    sink = io.BytesIO()
    np.savez(sink, identity=np.array(digest), keys=np.array(keys, dtype=object).astype(str),
             image=image.astype(np.float16), text=text.astype(np.float16))
    atomic_write_bytes(path, sink.getvalue())
    return True


def embed_shards(embedder: Embedder, out: Path, urls: Sequence[str], pool: pd.DataFrame) -> int:
    """Embed the shards in `urls` (this rank's slice); -> how many were computed (not reused)."""
    computed = 0
    by_shard = {url: rows for url, rows in pool.groupby("shard", sort=False)}
    for url in urls:
        rows = by_shard.get(url, pool.iloc[:0])
        computed += embed_shard(embedder, out, url, rows)
    return computed


def load_embeddings(out: Path, urls: Sequence[str], pool: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(image [N, D], text [N, D]) float32 in pool row order, from the sidecars."""
    images, texts = [], []
    for url in urls:
        with np.load(sidecar_path(out, PASS, url, ".npz")) as stored:
            images.append(stored["image"].astype(np.float32))
            texts.append(stored["text"].astype(np.float32))
    image, text = np.concatenate(images), np.concatenate(texts)
    if len(image) != len(pool):
        raise UserError(f"the embedding sidecars hold {len(image)} pairs, the scan {len(pool)}: "
                        "rerun with a fresh --out")
    # float16 storage loses the unit norm slightly; the filters compare cosines
    image /= np.linalg.norm(image, axis=1, keepdims=True).clip(1e-12)
    text /= np.linalg.norm(text, axis=1, keepdims=True).clip(1e-12)
    return image, text
