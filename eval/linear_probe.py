"""Linear probe: logistic regression on frozen image features (the CLIP paper's section 3.2).

    features  = encode_image(train), encode_image(test)        # L2-normalised, frozen model
    for C in grid:  fit on (train - val), score on val         # val: a random val_fraction
    refit on all of train with the best C, report lp_acc1 on test

The features are the normalised embeddings, so the C grid means the same for every checkpoint
(raw feature norms drift during training). Ties in validation accuracy go to the smaller C,
the stronger regularisation.
"""

from __future__ import annotations

import dataclasses
import time
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from torch.utils.data import IterableDataset, Subset

from eval.config import InferenceConfig, LinearProbeConfig
from eval.datasets import ClassificationSet
from eval.features import encode_images
from eval.metrics import classification_metrics
from eval.results import EvalResult
from training.model.trained import TrainedModel

TASK = "linear_probe"


def _fit(x: np.ndarray, y: np.ndarray, c: float, cfg: LinearProbeConfig) -> tuple[LogisticRegression, bool]:
    model = LogisticRegression(C=c, max_iter=cfg.max_iter)
    with warnings.catch_warnings(), threadpool_limits(cfg.blas_threads, user_api="blas"):
        # Reported once in the result's details instead of once per fit on stderr.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return model, bool(np.all(model.n_iter_ < cfg.max_iter))


def _scores(model: LogisticRegression, x: np.ndarray, num_classes: int) -> torch.Tensor:
    """Class scores [N, num_classes]; classes absent from the training labels score -inf."""
    scores = torch.full((len(x), num_classes), float("-inf"), dtype=torch.float64)
    log_proba = torch.as_tensor(model.predict_log_proba(x), dtype=torch.float64)
    scores[:, torch.as_tensor(model.classes_)] = log_proba
    return scores


def fit_linear_probe(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
    num_classes: int, cfg: LinearProbeConfig,
) -> tuple[dict[str, float], dict]:
    """-> (metrics lp_acc1, lp_acc5, lp_mean_per_class_recall on test; details of the search)."""
    if len(np.unique(train_y)) < 2:
        raise ValueError("the linear probe needs at least two classes in the training images")
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(train_x))
    n_val = max(1, int(round(cfg.val_fraction * len(train_x))))
    val, fit = order[:n_val], order[n_val:]
    val_acc = {}
    for c in sorted(cfg.c_grid):
        model, _ = _fit(train_x[fit], train_y[fit], c, cfg)
        val_acc[c] = float((model.predict(train_x[val]) == train_y[val]).mean())
    best_c = max(sorted(val_acc), key=lambda c: (val_acc[c], -c))
    model, converged = _fit(train_x, train_y, best_c, cfg)
    metrics = classification_metrics(
        _scores(model, test_x, num_classes), torch.as_tensor(test_y, dtype=torch.long)
    )
    details = {
        "best_C": best_c,
        "val_acc1_by_C": {f"{c:g}": acc for c, acc in val_acc.items()},
        "train_images": int(len(train_x)),
        "val_images": int(n_val),
        "converged": converged,
        # The best C on the edge of the grid means the optimum may lie beyond it.
        "best_C_on_grid_edge": best_c in (min(cfg.c_grid), max(cfg.c_grid)),
    }
    return {f"lp_{name}": value for name, value in metrics.items()}, details


def linear_probe(
    trained: TrainedModel, data: ClassificationSet, infer: InferenceConfig, cfg: LinearProbeConfig,
    test_features: tuple[torch.Tensor, list[int]] | None = None,
) -> EvalResult:
    if data.train is None:
        raise ValueError(f"{data.name} has no training split for the linear probe")
    started = time.perf_counter()
    train_set, train_infer = data.train, infer
    if cfg.max_train_images is not None:
        if isinstance(train_set, IterableDataset):  # shards: the first N (they are shuffled)
            train_infer = dataclasses.replace(infer, max_images=cfg.max_train_images)
        elif len(train_set) > cfg.max_train_images:
            pick = np.random.default_rng(cfg.seed).choice(len(train_set), cfg.max_train_images,
                                                          replace=False)
            train_set = Subset(train_set, sorted(pick.tolist()))
    train_x, train_y = encode_images(trained.model, train_set, train_infer, f"{data.name} train")
    test_x, test_y = test_features or encode_images(trained.model, data.test, infer, data.name)
    num_classes = len(data.classnames)
    metrics, details = fit_linear_probe(
        train_x.numpy(), np.asarray(train_y), test_x.numpy(), np.asarray(test_y), num_classes, cfg
    )
    return EvalResult(
        dataset=data.name,
        task=TASK,
        metrics=metrics,
        chance={"lp_acc1": 1 / num_classes, "lp_acc5": min(5, num_classes) / num_classes,
                "lp_mean_per_class_recall": 1 / num_classes},
        num_images=len(test_y),
        details=details,
        seconds=time.perf_counter() - started,
    )
