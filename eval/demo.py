"""The demo corpus suite: does the model bind colour to shape, even for pairs it never saw?

The corpus (data_pipeline.demo_corpus) holds out 8 of the 48 colour x shape pairs from training;
its heldout/ split shows only those. Results:

    demo_heldout  zeroshot_classification
        acc1          among all 48 colour x shape classes, the held-out image gets its true pair
                      (the compositional measure; chance 1/48)
        heldout_acc1  the same among the 8 held-out classes only (chance 1/8). The corpus holds
                      out one pair per colour, so colour alone tells these 8 apart: read it with
                      colour_acc1 / shape_acc1, and trust acc1 for composition
        colour_acc1 / shape_acc1   the top-1 class has the right colour / shape (1/8, 1/6)
        acc5, mean_per_class_recall
    demo_val      zeroshot_classification   the same over all 48 classes, on pairs seen in training
    demo_val      zeroshot_retrieval        recall@1/5/10 between val images and their captions

Classes and prompt templates come from ROOT/corpus.json, which the corpus builder writes.
`zero_shot_during_training` is the fast version the trainer may call on rank 0.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from data_pipeline.errors import UserError
from eval.config import InferenceConfig
from eval.datasets import ClassificationSet
from eval.features import class_embeddings, encode_images, encode_texts
from eval.metrics import (
    classification_chance, classification_metrics, retrieval_chance, retrieval_metrics,
)
from eval.results import EvalResult
from data_pipeline.shard_format import RawSample, captions, decode_metadata
from eval.shard_images import ShardImages, shard_urls
from training.text.tokenizer import Tokenizer
from training.model.trained import TrainedModel

LAYOUT = "a demo corpus root with corpus.json and train/ val/ heldout/ shard folders " \
         "(python -m data_pipeline.shards --output DIR)"


@dataclass
class DemoCorpus:
    root: Path
    classnames: list[str]
    colours: list[str]  # per class
    shapes: list[str]  # per class
    held_out: list[int]  # indices of the held-out classes
    templates: list[str]

    @property
    def index(self) -> dict[tuple[str, str], int]:
        return {(c, s): i for i, (c, s) in enumerate(zip(self.colours, self.shapes))}

    def split(self, name: str) -> list[str]:
        return shard_urls(str(self.root / name), f"--demo {self.root}")


def read_corpus(root: Path) -> DemoCorpus:
    path = Path(root) / "corpus.json"
    if not path.is_file():
        raise UserError(f"--demo {root}: no corpus.json; expected {LAYOUT}")
    spec = json.loads(path.read_text(encoding="utf-8"))
    classes = spec["classes"]
    return DemoCorpus(
        root=Path(root),
        classnames=[c["name"] for c in classes],
        colours=[c["colour"] for c in classes],
        shapes=[c["shape"] for c in classes],
        held_out=[i for i, c in enumerate(classes) if c["held_out"]],
        templates=list(spec["prompt_templates"]),
    )


def demo_sample(index: dict[tuple[str, str], int], raw: RawSample) -> tuple[int, list[str]] | None:
    """(class index, captions) of a demo sample, from the attributes in its .json."""
    meta = decode_metadata(raw)
    label = index.get((meta.get("colour"), meta.get("shape")))
    return None if label is None else (label, captions(raw) or [])


def demo_label(index: dict[tuple[str, str], int], raw: RawSample) -> int | None:
    found = demo_sample(index, raw)
    return None if found is None else found[0]


def demo_classification_set(corpus: DemoCorpus, image_size: int, with_train: bool) -> ClassificationSet:
    """val as the test split, train for the linear probe; labels = colour x shape class."""
    label = partial(demo_label, corpus.index)
    train = ShardImages(corpus.split("train"), image_size, label) if with_train else None
    return ClassificationSet("demo_val", corpus.classnames, corpus.templates,
                             ShardImages(corpus.split("val"), image_size, label), train)


def demo_metrics(features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor,
                 corpus: DemoCorpus, heldout: bool) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics, chance) of zero-shot classification over all colour x shape classes."""
    logits = features @ classifier.T
    metrics = classification_metrics(logits, labels)
    chance = classification_chance(len(corpus.classnames))
    pairs = list(zip(logits.argmax(dim=1).tolist(), labels.tolist()))  # (predicted, true)
    truth = [t for _, t in pairs]
    for name, attribute in (("colour", corpus.colours), ("shape", corpus.shapes)):
        metrics[f"{name}_acc1"] = sum(attribute[p] == attribute[t] for p, t in pairs) / len(pairs)
    chance["colour_acc1"] = 1 / len(set(corpus.colours))
    chance["shape_acc1"] = 1 / len(set(corpus.shapes))
    if heldout:
        # Restricted to the held-out classes: does the model tell the unseen pairs apart?
        columns = torch.tensor(corpus.held_out)
        position = {c: i for i, c in enumerate(corpus.held_out)}
        inside = torch.tensor([position[t] for t in truth])
        metrics["heldout_acc1"] = (logits[:, columns].argmax(dim=1) == inside).float().mean().item()
        chance["heldout_acc1"] = 1 / len(columns)
    return metrics, chance


def evaluate_demo(trained: TrainedModel, root: Path, cfg: InferenceConfig) -> list[EvalResult]:
    corpus = read_corpus(root)
    model, tokenizer = trained.model, trained.tokenizer
    classifier = class_embeddings(model, tokenizer, corpus.classnames, corpus.templates, cfg)
    payload = partial(demo_sample, corpus.index)
    results = []
    val_features, val_payloads = None, None
    for split, heldout in (("heldout", True), ("val", False)):
        started = time.perf_counter()
        data = ShardImages(corpus.split(split), trained.image_size, payload)
        features, payloads = encode_images(model, data, cfg, f"demo {split}")
        labels = torch.tensor([label for label, _ in payloads])
        metrics, chance = demo_metrics(features, labels, classifier, corpus, heldout)
        results.append(EvalResult(
            f"demo_{split}", "zeroshot_classification", metrics, chance, len(labels),
            {"classes": len(corpus.classnames), "templates": len(corpus.templates),
             "held_out_classes": [corpus.classnames[i] for i in corpus.held_out],
             "precision": cfg.precision, "max_images": cfg.max_images},
            time.perf_counter() - started,
        ))
        val_features, val_payloads = features, payloads
    # Retrieval on the val images already encoded above: only their captions are new work.
    started = time.perf_counter()
    groups = [caps for _, caps in val_payloads]
    texts = [text for group in groups for text in group]
    owner = torch.tensor([i for i, group in enumerate(groups) for _ in group])
    text_features = encode_texts(model, tokenizer, texts, cfg)
    results.append(EvalResult(
        "demo_val", "zeroshot_retrieval",
        retrieval_metrics(val_features @ text_features.T, owner),
        retrieval_chance([len(g) for g in groups]), len(groups), {"texts": len(texts)},
        time.perf_counter() - started,
    ))
    return results


# -- in-training hook ----------------------------------------------------------------------------


class DemoZeroShot:
    """The trainer's zero-shot check on the demo corpus (rank 0 only). Built once per run: it
    decodes the first `max_images` of heldout/ and val/ on its first call and keeps them (a few
    MB at demo sizes) for the run's later calls, and only for this run.

    Calling it with the bare CLIP (not the DDP wrapper) and its tokenizer returns
    {"zeroshot/demo_heldout/acc1", "zeroshot/demo_heldout/heldout_acc1", "zeroshot/demo_val/acc1"};
    the prefix differs from the eval jobs' "eval/" so the two never collide in one W&B run. The
    model's train/eval mode is restored. 256 + 256 images and 192 prompts: 4-6 s for `tiny` on
    two busy CPU cores, milliseconds on a GPU.
    """

    def __init__(self, demo_root: str | Path, image_size: int, device: str | torch.device = "cpu",
                 max_images: int = 256, batch_size: int = 256) -> None:
        self.corpus = read_corpus(Path(demo_root))
        self.image_size, self.device = image_size, device
        self.max_images, self.batch_size = max_images, batch_size
        self._images: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def images(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self._images is None:
            loaded = {}
            for split in ("heldout", "val"):
                label = partial(demo_label, self.corpus.index)
                data = ShardImages(self.corpus.split(split), self.image_size, label)
                images, labels = [], []
                for image, value in data:
                    images.append(image)
                    labels.append(value)
                    if len(images) == self.max_images:
                        break
                loaded[split] = (torch.stack(images), torch.tensor(labels))
            self._images = loaded
        return self._images

    def __call__(self, model: nn.Module, tokenizer: Tokenizer) -> dict[str, float]:
        corpus, device = self.corpus, self.device
        cfg = InferenceConfig(batch_size=self.batch_size, workers=0, precision="fp32",
                              device=str(device))
        was_training = model.training
        model.eval()
        try:
            classifier = class_embeddings(model, tokenizer, corpus.classnames, corpus.templates, cfg)
            out = {}
            for split, (images, labels) in self.images().items():
                with torch.no_grad():
                    features = torch.cat([
                        model.encode_image(chunk.to(device), normalize=True).float().cpu()
                        for chunk in images.split(self.batch_size)
                    ])
                metrics, _ = demo_metrics(features, labels, classifier, corpus, split == "heldout")
                out[f"zeroshot/demo_{split}/acc1"] = metrics["acc1"]
                if split == "heldout":
                    out["zeroshot/demo_heldout/heldout_acc1"] = metrics["heldout_acc1"]
            return out
        finally:
            model.train(was_training)


def zero_shot_during_training(
    model: nn.Module, tokenizer: Tokenizer, demo_root: str | Path, image_size: int,
    device: str | torch.device = "cpu", max_images: int = 256, batch_size: int = 256,
) -> dict[str, float]:
    """One `DemoZeroShot` call (decoding the images afresh)."""
    return DemoZeroShot(demo_root, image_size, device, max_images, batch_size)(model, tokenizer)
