"""Rebuild a trained CLIP from one of our checkpoints: model, tokenizer and metadata.

Checkpoints carry the fitted model config and the tokenizer's JSON, so eval jobs, search and
exports need nothing but the checkpoint file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from data_pipeline.errors import UserError
from training import checkpoint as ckpt
from training.model import CLIP, build_model
from training.model.configs import ClipModelConfig
from training.text.tokenizer import Tokenizer


@dataclass
class TrainedModel:
    model: CLIP
    tokenizer: Tokenizer
    model_config: ClipModelConfig
    step: int
    image_size: int
    path: Path


def resolve_checkpoint(path: Path, option: str = "--checkpoint") -> Path:
    """A checkpoint (a file, or an fsdp2 run's sharded step_N.dcp folder) as given, or a run
    folder's newest checkpoint; UserError otherwise."""
    if ckpt.is_sharded_checkpoint(path):
        return path
    if path.is_dir():
        found = ckpt.evaluable_checkpoints(path)
        if not found:
            raise UserError(f"{option} {path}: no checkpoints/step_*.pt (or step_*.dcp) inside")
        return found[-1]
    if not path.is_file():
        raise UserError(f"{option} {path}: no such file or run folder")
    return path


def load_trained_model(path: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    path = Path(path)
    if not (path.is_file() or ckpt.is_sharded_checkpoint(path)):
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = ckpt.load_checkpoint(path)
    config = state["config"]
    model_cfg = ClipModelConfig.from_dict(config["model_config"])
    tokenizer = Tokenizer.from_json(state["tokenizer"], context_length=model_cfg.text.context_length)
    model = build_model(model_cfg)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    return TrainedModel(
        model=model,
        tokenizer=tokenizer,
        model_config=model_cfg,
        step=int(state["step"]),
        image_size=model_cfg.vision.image_size,
        path=path,
    )
