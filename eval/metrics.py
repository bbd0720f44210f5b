"""Metrics of zero-shot classification and retrieval, named as CLIP_benchmark names them, and the
chance level of each (what a model that ranks at random would score on the same data).

All functions take plain tensors and know nothing of models, so they are tested on hand-built
score matrices with known answers (tests/test_eval_metrics.py).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

RECALL_KS: tuple[int, ...] = (1, 5, 10)


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """logits [N, C] (any monotone score), targets [N] class indices.

    acc1 / acc5: the true class is the top-1 / among the top-5 scores (top-C when C < 5).
    mean_per_class_recall: per-class accuracy averaged over the classes present in `targets`
    (balanced accuracy), which is what matters when some classes have few images.
    """
    if logits.ndim != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(f"need logits [N, C] and targets [N], got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("no samples to score")
    targets = targets.to(logits.device)
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit1 = top[:, 0] == targets
    hit5 = (top == targets[:, None]).any(dim=1)
    recalls = [hit1[targets == c].float().mean() for c in targets.unique()]
    return {
        "acc1": hit1.float().mean().item(),
        "acc5": hit5.float().mean().item(),
        "mean_per_class_recall": torch.stack(recalls).mean().item(),
    }


def classification_chance(num_classes: int) -> dict[str, float]:
    return {
        "acc1": 1 / num_classes,
        "acc5": min(5, num_classes) / num_classes,
        "mean_per_class_recall": 1 / num_classes,
    }


def retrieval_metrics(
    similarity: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int] = RECALL_KS,
    chunk: int = 4096,
) -> dict[str, float]:
    """similarity [N_images, N_texts]; text_to_image [N_texts]: the image each text describes.

    image_retrieval_recall@k: a text query finds its image among the top-k images.
    text_retrieval_recall@k: an image query finds at least one of its texts among the top-k.
    k larger than the candidate count is clipped (recall is then 1). Queries are scored in
    chunks so a 5k x 25k Flickr/COCO matrix never needs a second full-size copy.
    """
    n_images, n_texts = similarity.shape
    text_to_image = text_to_image.to(similarity.device)
    if text_to_image.shape != (n_texts,):
        raise ValueError(f"text_to_image must have {n_texts} entries, got {tuple(text_to_image.shape)}")
    metrics: dict[str, float] = {}
    kmax_img = min(max(ks), n_images)
    kmax_txt = min(max(ks), n_texts)
    img_hits = {k: 0 for k in ks}
    for start in range(0, n_texts, chunk):
        scores = similarity[:, start : start + chunk].T  # [texts, images]
        top = scores.topk(kmax_img, dim=1).indices
        truth = text_to_image[start : start + chunk, None]
        for k in ks:
            img_hits[k] += (top[:, : min(k, n_images)] == truth).any(dim=1).sum().item()
    txt_hits = {k: 0 for k in ks}
    for start in range(0, n_images, chunk):
        scores = similarity[start : start + chunk]  # [images, texts]
        top = scores.topk(kmax_txt, dim=1).indices
        owner = text_to_image[top]  # [images, kmax]: which image each retrieved text describes
        me = torch.arange(start, start + scores.shape[0], device=scores.device)[:, None]
        for k in ks:
            txt_hits[k] += (owner[:, : min(k, n_texts)] == me).any(dim=1).sum().item()
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = img_hits[k] / n_texts
        metrics[f"text_retrieval_recall@{k}"] = txt_hits[k] / n_images
    return metrics


def retrieval_chance(texts_per_image: Sequence[int], ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Recall@k of a random ranking: k/N for a text query; for an image query with m of the T
    texts, 1 - C(T-m, k) / C(T, k) (none of its m texts drawn among k), averaged over images."""
    n_images, n_texts = len(texts_per_image), sum(texts_per_image)
    chance = {}
    for k in ks:
        chance[f"image_retrieval_recall@{k}"] = min(k, n_images) / n_images
        kk = min(k, n_texts)
        misses = [math.comb(n_texts - m, kk) / math.comb(n_texts, kk) for m in texts_per_image]
        chance[f"text_retrieval_recall@{k}"] = 1 - sum(misses) / n_images
    return chance


# -- group and per-class metrics (WILDS, fairness sets) ------------------------------------------


def group_accuracy(
    hits: torch.Tensor, groups: torch.Tensor, exclude: Sequence[int] = ()
) -> tuple[float, dict[int, float]]:
    """hits [N] (1 = right), groups [N] integer group ids -> (worst accuracy over the groups
    present, {group: accuracy}). Groups in `exclude` are reported but not counted as the worst
    (FMoW's "Other" region). WILDS's worst-group accuracy, without torch_scatter."""
    hits, groups = hits.float(), groups.long()
    per_group = {int(g): hits[groups == g].mean().item() for g in groups.unique()}
    counted = [v for g, v in per_group.items() if g not in set(exclude)]
    if not counted:
        raise ValueError("no group left to take the worst of")
    return min(counted), per_group


def macro_f1(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """F1 averaged over the classes present in `targets` (WILDS's F1 with average="macro"
    and labels = the true classes; iWildCam's main metric). A class never predicted right
    scores 0."""
    scores = []
    for c in targets.unique():
        predicted, actual = predictions == c, targets == c
        true_pos = (predicted & actual).sum().item()
        precision = true_pos / max(predicted.sum().item(), 1)
        recall = true_pos / actual.sum().item()
        scores.append(0.0 if true_pos == 0 else 2 * precision * recall / (precision + recall))
    return sum(scores) / len(scores)
