"""The image-text alignment filter: CLIP score = cosine(image embedding, text embedding).

LAION-400M kept pairs with a ViT-B/32 CLIP score >= 0.28 (Schuhmann et al. 2021); DataComp's
CLIP-score baseline keeps the top 30% of its pool by a ViT-L/14 score (Gadre et al. 2023,
table 3). A fixed threshold only means something for the model it was tuned on, so the top
fraction is usually the better default for a new model; both are here. The histogram of scores
with the cut marked is saved, since choosing the cut is a judgement people want to see.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def clip_scores(image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Row-wise cosine of L2-normalised embeddings [N, D] -> [N] (float32)."""
    return np.einsum("nd,nd->n", image.astype(np.float32), text.astype(np.float32))


def cut_for(scores: np.ndarray, threshold: float | None, top_fraction: float | None) -> float:
    """The score at or above which a pair is kept. Top fraction: the (1 - f) quantile of the
    pool's scores (ties at the cut are kept, so slightly more than f may stay)."""
    if threshold is not None:
        return float(threshold)
    assert top_fraction is not None
    if len(scores) == 0:
        return float("-inf")
    return float(np.quantile(scores, 1.0 - top_fraction, method="higher"))


def save_histogram(scores: np.ndarray, cut: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    ax.hist(scores, bins=60, color="#4c72b0")
    ax.axvline(cut, color="#c44e52", linestyle="--", label=f"cut {cut:.3f}")
    kept = float((scores >= cut).mean()) if len(scores) else 0.0
    ax.set(xlabel="CLIP score (image-text cosine)", ylabel="pairs",
           title=f"{title}: {100 * kept:.1f}% kept")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
