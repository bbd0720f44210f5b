"""Pictures of results: every metric against training step, and search result grids.

matplotlib runs with the Agg backend (files only), so eval jobs work on headless machines.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen before pyplot loads
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image  # noqa: E402

METRICS_PNG = "metrics.png"


def plot_metrics(results: list[dict[str, Any]], out_path: Path) -> Path | None:
    """One panel per (dataset, task), one line per metric, x = checkpoint step; chance levels
    dotted in the same colour. `results` as eval.results.read_results returns them."""
    if not results:
        return None
    panels: dict[tuple[str, str], dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    chance: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for r in results:
        for name, value in r["metrics"].items():
            panels[(r["dataset"], r["task"])][name].append((r["step"], value))
        chance[(r["dataset"], r["task"])].update(r.get("chance", {}))
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)
    for ax, ((dataset, task), metrics) in zip(axes.flat, sorted(panels.items())):
        for name, points in sorted(metrics.items()):
            points.sort()
            steps, values = zip(*points)
            line, = ax.plot(steps, [100 * v for v in values], marker="o", markersize=3, label=name)
            level = chance[(dataset, task)].get(name)
            if level is not None:
                ax.axhline(100 * level, color=line.get_color(), linestyle=":", linewidth=0.8)
        ax.set_title(f"{dataset} / {task}", fontsize=9)
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("% (dotted: chance)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def plot_search_grid(
    query: str, images: Sequence[Image.Image], scores: Sequence[float], labels: Sequence[str],
    out_path: Path,
) -> Path:
    """The top matches of one query in a square-ish grid, each titled with its score and key."""
    n = max(1, len(images))
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, score, label in zip(axes.flat, images, scores, labels):
        ax.imshow(image)
        ax.set_title(f"{score:.3f}  {label}", fontsize=7)
    fig.suptitle(query, fontsize=10)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
