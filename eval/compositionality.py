"""Compositionality: SugarCrepe and Winoground, from local copies in their published layouts.

SugarCrepe (Hsieh et al. 2023, github.com/RAIVNLab/sugar-crepe): `data/<category>.json` for the
seven categories (add_att, add_obj, replace_att, replace_obj, replace_rel, swap_att, swap_obj),
each {"<id>": {"filename": "000000397133.jpg", "caption": ..., "negative_caption": ...}}, over
COCO val2017 images. An image is scored right when its caption is closer than the hard negative;
accuracy per category (chance 50%) and their mean.

Winoground (Thrush et al. 2022, huggingface.co/datasets/facebook/winoground): `data/examples.jsonl`
(id, image_0, image_1, caption_0, caption_1, tag, ...) and `data/images/<image_k>.png`. With s(c, i)
the similarity of caption c and image i: text score = both images pick their own caption
(s(c0,i0) > s(c1,i0) and s(c1,i1) > s(c0,i1)); image score = both captions pick their own image
(s(c0,i0) > s(c0,i1) and s(c1,i1) > s(c1,i0)); group score = both. Chance 25%, 25%, 16.7%.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from data_pipeline.errors import UserError
from eval.config import InferenceConfig
from eval.datasets import FileImages
from eval.features import encode_images, encode_texts
from eval.results import EvalResult
from training.model.trained import TrainedModel

TASK = "compositionality"
SUGARCREPE_CATEGORIES = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel",
                         "swap_att", "swap_obj")
SUGARCREPE_LAYOUT = ("the sugar-crepe checkout (data/add_att.json ... data/swap_obj.json, or the "
                     "JSONs themselves) with COCO val2017 images in val2017/ or images/ beside them "
                     "(or --sugarcrepe-images DIR)")
WINOGROUND_LAYOUT = "the facebook/winoground copy: data/examples.jsonl and data/images/*.png"


# -- metrics -------------------------------------------------------------------------------------


def winoground_scores(s: torch.Tensor) -> dict[str, float]:
    """s [N, 2, 2]: s[n, c, i] = similarity of caption c and image i of example n."""
    text = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
    image = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
    return {"text_score": text.float().mean().item(), "image_score": image.float().mean().item(),
            "group_score": (text & image).float().mean().item()}


WINOGROUND_CHANCE = {"text_score": 0.25, "image_score": 0.25, "group_score": 1 / 6}


# -- SugarCrepe ----------------------------------------------------------------------------------


def _first_dir(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.is_dir()), None)


def sugarcrepe_files(root: Path, images: Path | None = None) -> tuple[dict[str, Path], Path]:
    """({category: its JSON}, image folder); at least one category must be there."""
    if not root.is_dir():
        raise UserError(f"--sugarcrepe {root}: no such folder; expected {SUGARCREPE_LAYOUT}")
    data = _first_dir(root / "data") or root
    files = {c: data / f"{c}.json" for c in SUGARCREPE_CATEGORIES if (data / f"{c}.json").is_file()}
    if not files:
        raise UserError(f"--sugarcrepe {root}: none of {', '.join(SUGARCREPE_CATEGORIES)} .json "
                        f"found; expected {SUGARCREPE_LAYOUT}")
    folder = images or _first_dir(root / "val2017", root / "images", root.parent / "val2017")
    if folder is None or not folder.is_dir():
        raise UserError(f"--sugarcrepe {root}: no COCO val2017 image folder; expected "
                        f"{SUGARCREPE_LAYOUT}")
    return files, folder


def _read_sugarcrepe(path: Path, images: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        rows = [(images / e["filename"], (e["caption"], e["negative_caption"]))
                for e in entries.values()]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{path}: expected {{\"<id>\": {{\"filename\", \"caption\", "
                        f"\"negative_caption\"}}, ...}}") from None
    absent = [p for p, _ in rows if not p.is_file()]
    if absent:
        raise UserError(f"{path}: {len(absent)} image(s) not in {images}, e.g. {absent[0].name}")
    return [p for p, _ in rows], [c for _, c in rows]


def evaluate_sugarcrepe(trained: TrainedModel, root: Path, images: Path | None,
                        cfg: InferenceConfig) -> EvalResult:
    started = time.perf_counter()
    files, folder = sugarcrepe_files(root, images)
    metrics, counts = {}, {}
    for category, path in files.items():
        paths, pairs = _read_sugarcrepe(path, folder)
        features, payloads = encode_images(trained.model, FileImages(paths, pairs,
                                           trained.image_size), cfg, f"sugarcrepe {category}")
        positive = encode_texts(trained.model, trained.tokenizer, [p for p, _ in payloads], cfg)
        negative = encode_texts(trained.model, trained.tokenizer, [n for _, n in payloads], cfg)
        right = (features * positive).sum(-1) > (features * negative).sum(-1)
        metrics[category] = right.float().mean().item()
        counts[category] = len(payloads)
    metrics["average"] = sum(metrics.values()) / len(metrics)
    return EvalResult("sugarcrepe", TASK, metrics, {k: 0.5 for k in metrics},
                      sum(counts.values()),
                      {"per_category_images": counts, "precision": cfg.precision,
                       "missing_categories": [c for c in SUGARCREPE_CATEGORIES if c not in files]},
                      time.perf_counter() - started)


# -- Winoground ----------------------------------------------------------------------------------


def winoground_examples(root: Path) -> tuple[list[dict], Path]:
    data = _first_dir(root / "data") or root
    examples_file, images = data / "examples.jsonl", _first_dir(data / "images", root / "images")
    if not root.is_dir() or not examples_file.is_file() or images is None:
        raise UserError(f"--winoground {root}: expected {WINOGROUND_LAYOUT}")
    try:
        examples = [json.loads(line) for line in examples_file.read_text(encoding="utf-8")
                    .splitlines() if line.strip()]
        for e in examples:
            e["paths"] = [images / f"{e[f'image_{k}']}.png" for k in (0, 1)]
            e["captions"] = [e["caption_0"], e["caption_1"]]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{examples_file}: expected one JSON object per line with image_0, "
                        f"image_1, caption_0, caption_1") from None
    absent = [p for e in examples for p in e["paths"] if not p.is_file()]
    if not examples or absent:
        raise UserError(f"--winoground {root}: " + (f"{len(absent)} image(s) missing, e.g. "
                        f"{absent[0].name}" if absent else "no examples"))
    return examples, images


def evaluate_winoground(trained: TrainedModel, root: Path, cfg: InferenceConfig) -> EvalResult:
    started = time.perf_counter()
    examples, _ = winoground_examples(root)
    slots = [(n, k) for n in range(len(examples)) for k in (0, 1)]
    data = FileImages([examples[n]["paths"][k] for n, k in slots], slots, trained.image_size)
    features, payloads = encode_images(trained.model, data, cfg, "winoground")
    image = torch.empty(len(examples), 2, features.shape[1])
    for row, (n, k) in zip(features, payloads):
        image[n, k] = row
    texts = encode_texts(trained.model, trained.tokenizer,
                         [c for e in examples for c in e["captions"]], cfg)
    text = texts.view(len(examples), 2, -1)
    similarity = torch.einsum("ncd,nid->nci", text, image)  # [N, caption, image]
    return EvalResult("winoground", TASK, winoground_scores(similarity), dict(WINOGROUND_CHANCE),
                      len(examples), {"precision": cfg.precision},
                      time.perf_counter() - started)
