"""Our checkpoints as OpenCLIP-loadable files: weights + model config.

    files = export_openclip(load_trained_model("runs/x/checkpoints/step_00010000.pt"), "export/")

writes into the folder
    open_clip_pytorch_model.bin   the state dict in OpenCLIP's layout (torch.save, fp32)
    open_clip_config.json         {"model_cfg": ..., "preprocess_cfg": ...}: what OpenCLIP's
                                  `local-dir:` loader reads
    NAME.json                     the bare model config, named after OpenCLIP's architecture
                                  (ViT-B-32, ViT-B-32-quickgelu, ...), for
                                  open_clip.add_model_config

and then any of these load it (WEIGHTS = export/open_clip_pytorch_model.bin):
    open_clip.create_model_and_transforms("ViT-B-32", pretrained="WEIGHTS")
    open_clip.create_model_and_transforms("local-dir:export")
    clip_benchmark eval --model ViT-B-32 --pretrained WEIGHTS ...

Only the architectures of openclip_layout.ARCHITECTURES trained with CLIP's BPE tokenizer can be
exported: OpenCLIP builds those with its own tokenizer, and the ids must mean the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from data_pipeline.errors import UserError
from training.interop.openclip_layout import openclip_model_config, to_openclip_state_dict
from training.model.trained import TrainedModel
from training.text.clip_vocab import CLIP_EOT_ID, CLIP_SOT_ID
from training.data.transforms import CLIP_MEAN, CLIP_STD

WEIGHTS_FILE = "open_clip_pytorch_model.bin"
CONFIG_FILE = "open_clip_config.json"
# CLIP's SOT/EOT ids: a tokenizer with these and CLIP's vocab size is CLIP's BPE.
_CLIP_SPECIAL_IDS = (CLIP_SOT_ID, CLIP_EOT_ID)


@dataclass
class ExportedFiles:
    openclip_name: str
    weights: Path
    config: Path
    model_config: Path


def export_openclip(trained: TrainedModel, out_dir: str | Path) -> ExportedFiles:
    cfg = trained.model_config
    try:
        name, model_cfg = openclip_model_config(cfg)
    except ValueError as err:
        raise UserError(f"cannot export {trained.path} to OpenCLIP: {err}") from None
    tok = trained.tokenizer
    if (tok.sot_id, tok.eot_id) != _CLIP_SPECIAL_IDS:
        raise UserError(f"cannot export {trained.path} to OpenCLIP: it was trained with its own "
                        f"tokenizer ({tok!r}), not CLIP's BPE, which OpenCLIP would use")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_FILE
    torch.save(to_openclip_state_dict(trained.model), weights)
    # The eval preprocessing our models were trained for, in OpenCLIP's terms (its defaults,
    # written out so the file says what it means).
    preprocess_cfg = {"size": cfg.vision.image_size, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                      "interpolation": "bicubic", "resize_mode": "shortest"}
    config = out_dir / CONFIG_FILE
    config.write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg},
                                 indent=2) + "\n", encoding="utf-8")
    model_config = out_dir / f"{name}.json"
    model_config.write_text(json.dumps(model_cfg, indent=2) + "\n", encoding="utf-8")
    return ExportedFiles(name, weights, config, model_config)
