"""Eval results into the training run's W&B run, at the step of the checkpoint they score.

The run id and project come from the checkpoint (state["wandb_run_id"], state["config"]["log"]),
and the run is resumed with resume="allow", so eval curves sit beside the training loss. A run
trained without W&B gets a new run named after its run folder.

Eval metrics are logged as `eval/<dataset>/<metric>` against their own x-axis `eval/step`
(define_metric) rather than with `log(step=...)`: W&B drops any log whose step is below the run's
current step, and the trainer is usually far ahead of the checkpoint being scored.
Mode "auto" = online when an API key is configured, offline otherwise (`wandb sync` later).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from eval.results import EvalResult
from training.wandb_setup import start_wandb_run

WandbMode = Literal["auto", "online", "offline"]


def checkpoint_wandb_meta(path: Path) -> dict[str, Any]:
    """{"id", "project", "entity"} of the W&B run that trained a checkpoint (id may be None).
    mmap: only the few small entries read here are paged in, not the weights."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    log = (state.get("config") or {}).get("log") or {}
    return {
        "id": state.get("wandb_run_id"),
        "project": log.get("wandb_project") or "clipstream",
        "entity": log.get("wandb_entity"),
    }


def wandb_payload(step: int, results: list[EvalResult]) -> dict[str, float]:
    payload: dict[str, float] = {"eval/step": step}
    for r in results:
        for name, value in r.metrics.items():
            payload[f"eval/{r.dataset}/{name}"] = value
    return payload


class WandbSink:
    """Opens the run on first use (from the first checkpoint's metadata) and keeps it open for
    the rest of a watch; `close` finishes it."""

    def __init__(self, mode: WandbMode, run_dir: Path, run=None) -> None:
        self.mode, self.run_dir, self.run = mode, run_dir, run

    def _open(self, checkpoint: Path) -> None:
        meta = checkpoint_wandb_meta(checkpoint)
        self.run = start_wandb_run(
            self.mode,
            project=meta["project"],
            entity=meta["entity"],
            id=meta["id"],
            resume="allow" if meta["id"] else None,
            name=None if meta["id"] else f"{self.run_dir.name}-eval",
            dir=str(self.run_dir),
        )

    def log(self, checkpoint: Path, step: int, results: list[EvalResult]) -> None:
        if not results:
            return
        if self.run is None:
            self._open(checkpoint)
        self.run.define_metric("eval/step")
        self.run.define_metric("eval/*", step_metric="eval/step")
        self.run.log(wandb_payload(step, results))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
