"""Zero-shot classification: score each image against prompt-ensembled class embeddings.

    classifier = class_embeddings(classnames, templates)      # [C, D], built once per dataset
    logits     = image_features @ classifier.T                # cosine similarities
    metrics    = acc1, acc5, mean_per_class_recall             # eval.metrics

The logit scale is left out: it is one positive factor and changes no ranking.
"""

from __future__ import annotations

import time

import torch

from eval.config import InferenceConfig
from eval.datasets import ClassificationSet
from eval.features import class_embeddings, encode_images
from eval.metrics import classification_chance, classification_metrics
from eval.results import EvalResult
from training.model.trained import TrainedModel

TASK = "zeroshot_classification"


def zeroshot_classification(
    trained: TrainedModel, data: ClassificationSet, cfg: InferenceConfig,
    image_features: tuple[torch.Tensor, list[int]] | None = None,
) -> EvalResult:
    """image_features: (features, labels) of data.test when already encoded (linear probe)."""
    started = time.perf_counter()
    logits, targets = zeroshot_logits(trained, data, cfg, image_features)
    return EvalResult(
        dataset=data.name,
        task=TASK,
        metrics=classification_metrics(logits, targets),
        chance=classification_chance(len(data.classnames)),
        num_images=len(targets),
        details={"classes": len(data.classnames), "templates": len(data.templates),
                 "precision": cfg.precision, "max_images": cfg.max_images},
        seconds=time.perf_counter() - started,
    )


def zeroshot_logits(
    trained: TrainedModel, data: ClassificationSet, cfg: InferenceConfig,
    image_features: tuple[torch.Tensor, list[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine logits [N, C], targets [N]) of data.test: the per-sample scores behind the
    metrics, which the parity tests compare with CLIP_benchmark's image by image."""
    classifier = class_embeddings(trained.model, trained.tokenizer, data.classnames,
                                  data.templates, cfg)
    features, labels = image_features or encode_images(trained.model, data.test, cfg, data.name)
    return features @ classifier.T, torch.as_tensor(labels, dtype=torch.long)
