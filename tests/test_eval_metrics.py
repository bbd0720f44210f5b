"""Known-answer tests of the eval metrics, prompt ensembling and the linear probe's fitting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eval.config import InferenceConfig, LinearProbeConfig
from eval.features import class_embeddings
from eval.linear_probe import fit_linear_probe
from eval.metrics import (
    classification_chance, classification_metrics, retrieval_chance, retrieval_metrics,
)


def test_classification_metrics_known_answer():
    # 6 images, 3 classes. Rows: the scores; the true class is in `targets`.
    logits = torch.tensor([
        [0.9, 0.05, 0.05],  # class 0, right
        [0.2, 0.7, 0.1],    # class 0, wrong (second)
        [0.1, 0.8, 0.1],    # class 1, right
        [0.3, 0.6, 0.1],    # class 1, right
        [0.5, 0.4, 0.1],    # class 1, wrong (second)
        [0.6, 0.3, 0.1],    # class 2, wrong (third)
    ])
    targets = torch.tensor([0, 0, 1, 1, 1, 2])
    m = classification_metrics(logits, targets)
    assert m["acc1"] == pytest.approx(3 / 6)
    # Only 3 classes, so "top-5" is top-3: always right.
    assert m["acc5"] == pytest.approx(1.0)
    # Per class: 1/2, 2/3, 0/1 -> mean 7/18 (not the 3/6 of plain accuracy).
    assert m["mean_per_class_recall"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)


def test_top5_with_many_classes():
    logits = torch.arange(10, dtype=torch.float).repeat(3, 1)  # class 9 best, then 8, ...
    targets = torch.tensor([9, 5, 4])  # ranks 1, 5, 6
    m = classification_metrics(logits, targets)
    assert m["acc1"] == pytest.approx(1 / 3)
    assert m["acc5"] == pytest.approx(2 / 3)
    assert classification_chance(10) == {"acc1": 0.1, "acc5": 0.5, "mean_per_class_recall": 0.1}


def test_mean_per_class_recall_skips_absent_classes():
    logits = torch.eye(4)[[0, 0, 1]] + 0.01 * torch.arange(4)
    targets = torch.tensor([0, 0, 2])  # classes 1 and 3 absent: not averaged in
    assert classification_metrics(logits, targets)["mean_per_class_recall"] == pytest.approx(0.5)


def test_retrieval_metrics_known_answer():
    # 3 images, 5 texts: image 0 has texts 0,1; image 1 has texts 2,3; image 2 has text 4.
    text_to_image = torch.tensor([0, 0, 1, 1, 2])
    sim = torch.tensor([
        # t0    t1    t2    t3    t4
        [0.90, 0.10, 0.80, 0.20, 0.00],  # image 0: best text t0 (its own) -> text R@1 hit
        [0.50, 0.40, 0.30, 0.95, 0.10],  # image 1: best text t3 (its own) -> hit
        [0.70, 0.60, 0.20, 0.10, 0.50],  # image 2: t0, t1, t4 -> own text at rank 3
    ])
    m = retrieval_metrics(sim, text_to_image, ks=(1, 2, 5))
    # Text queries (columns): t0 -> image 0 (0.9) hit; t1 -> image 2 (0.6) miss, image 0 at
    # rank 3; t2 -> image 0 (0.8) miss, own image 1 rank 2; t3 -> image 1 hit; t4 -> image 2 hit.
    assert m["image_retrieval_recall@1"] == pytest.approx(3 / 5)
    assert m["image_retrieval_recall@2"] == pytest.approx(4 / 5)
    assert m["image_retrieval_recall@5"] == pytest.approx(1.0)  # k clipped to 3 images
    # Image queries (rows): image 0 hit at 1, image 1 hit at 1, image 2's text at rank 3.
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@2"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@5"] == pytest.approx(1.0)


def test_retrieval_metrics_chunking_matches_unchunked():
    gen = torch.Generator().manual_seed(0)
    sim = torch.randn(37, 90, generator=gen)
    owner = torch.randint(0, 37, (90,), generator=gen)
    assert retrieval_metrics(sim, owner, chunk=7) == retrieval_metrics(sim, owner, chunk=10_000)


def test_retrieval_chance_matches_simulation_and_formula():
    counts = [2, 2, 1]
    chance = retrieval_chance(counts, ks=(1, 2))
    assert chance["image_retrieval_recall@1"] == pytest.approx(1 / 3)
    # Image with 2 of 5 texts, k=1: 2/5; with 1 of 5: 1/5.
    assert chance["text_retrieval_recall@1"] == pytest.approx((2 / 5 + 2 / 5 + 1 / 5) / 3)
    # k=2: 1 - C(3,2)/C(5,2) = 0.7 for m=2; 1 - C(4,2)/C(5,2) = 0.4 for m=1.
    assert chance["text_retrieval_recall@2"] == pytest.approx((0.7 + 0.7 + 0.4) / 3)
    # And a random ranking scores that on average.
    gen = torch.Generator().manual_seed(1)
    owner = torch.tensor([0, 0, 1, 1, 2])
    runs = [retrieval_metrics(torch.rand(3, 5, generator=gen), owner, ks=(2,)) for _ in range(4000)]
    mean = sum(r["text_retrieval_recall@2"] for r in runs) / len(runs)
    assert mean == pytest.approx(chance["text_retrieval_recall@2"], abs=0.02)


class _BagOfWordsModel(torch.nn.Module):
    """encode_text = sum of per-token vectors: prompt ensembling can be checked by hand."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(vocab, dim)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        out = self.table(tokens).sum(dim=1)
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out


class _WordTokenizer:
    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        rows = [[self.ids.setdefault(w, len(self.ids) + 1) for w in t.split()] for t in texts]
        width = max(len(r) for r in rows)
        return torch.tensor([r + [0] * (width - len(r)) for r in rows])


def test_class_embeddings_are_renormalised_means_of_normalised_prompts():
    torch.manual_seed(0)
    model, tokenizer = _BagOfWordsModel(64, 8), _WordTokenizer()
    with torch.no_grad():
        model.table.weight[0] = 0  # padding contributes nothing
    classes, templates = ["cat", "red dog"], ["a photo of a {}.", "{}", "a drawing of the {}"]
    got = class_embeddings(model, tokenizer, classes, templates, InferenceConfig(batch_size=2, workers=0, precision="fp32"))
    for row, name in zip(got, classes):
        prompts = model.encode_text(tokenizer([t.format(name) for t in templates]))
        expected = prompts.mean(0) / prompts.mean(0).norm()
        torch.testing.assert_close(row, expected.detach())
    assert got.norm(dim=1).detach() == pytest.approx([1.0, 1.0])


def test_linear_probe_separable_blobs_and_c_selection():
    # Imbalanced (80/20) but separable: a tiny C shrinks the weights until only the (unpenalised)
    # intercept speaks, predicting the majority class; C=1 separates them. Val must pick C=1.
    rng = np.random.default_rng(0)
    centers = np.zeros((2, 16))
    centers[1, 0] = 6.0
    def blobs(n):
        y = (rng.random(n) < 0.2).astype(int)
        return centers[y] + rng.normal(size=(n, 16)), y
    train_x, train_y = blobs(400)
    test_x, test_y = blobs(200)
    cfg = LinearProbeConfig(c_grid=[1e-5, 1.0], blas_threads=1)
    metrics, details = fit_linear_probe(train_x, train_y, test_x, test_y, 2, cfg)
    assert metrics["lp_acc1"] > 0.95
    assert details["best_C"] == 1.0
    assert details["val_acc1_by_C"]["1e-05"] < 0.9 < details["val_acc1_by_C"]["1"]
    assert details["val_images"] == 80 and details["train_images"] == 400
    assert set(metrics) == {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall"}


def test_linear_probe_scores_classes_missing_from_train_as_wrong():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(-3, 1, (50, 2)), rng.normal(3, 1, (50, 2))])
    y = np.array([0] * 50 + [1] * 50)
    test_x = np.array([[-3.0, -3.0], [3.0, 3.0], [0.0, 9.0]])
    test_y = np.array([0, 1, 2])  # class 2 never seen in training
    metrics, _ = fit_linear_probe(x, y, test_x, test_y, 3, LinearProbeConfig(c_grid=[1.0], blas_threads=1))
    assert metrics["lp_acc1"] == pytest.approx(2 / 3)
    assert metrics["lp_mean_per_class_recall"] == pytest.approx(2 / 3)
    assert math.isclose(metrics["lp_acc5"], 1.0)
