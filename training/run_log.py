"""Where training metrics go: `RUN_DIR/metrics.jsonl` (always), W&B (optional), a tqdm bar.

Only rank 0 writes. W&B runs offline when no API key is configured, so a laptop or an air-gapped
cluster logs locally and `wandb sync` uploads later. A resumed run passes the W&B run id saved in
its checkpoint, so its curves continue the same W&B run instead of starting a new one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm


@dataclass
class LogConfig:
    every: int = 10  # steps between metric records
    wandb: bool = False
    wandb_project: str = "clipstream"
    wandb_entity: str | None = None
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)
    progress_bar: bool = True

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"log.every must be >= 1, got {self.every}")


def resolve_wandb_mode(mode: str) -> str:
    """"auto" = online when an API key is configured, offline otherwise (`wandb sync` later);
    the one decision shared by the trainer and the eval jobs."""
    if mode != "auto":
        return mode
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file()
    return "online" if has_key else "offline"


class RunLog:
    def __init__(
        self,
        cfg: LogConfig,
        run_dir: Path,
        total_steps: int,
        start_step: int,
        config: dict[str, Any],
        is_main: bool,
        wandb_run_id: str | None = None,
    ):
        self.cfg = cfg
        self.is_main = is_main
        self.wandb_run = None
        self.wandb_run_id = wandb_run_id
        self._file = None
        self._bar = None
        if not is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.progress_bar:
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if cfg.wandb:
            import wandb  # imported lazily: it is slow to import and optional

            self.wandb_run = wandb.init(
                project=cfg.wandb_project,
                entity=cfg.wandb_entity,
                name=cfg.run_name or run_dir.name,
                tags=cfg.tags,
                config=config,
                dir=str(run_dir),
                mode=resolve_wandb_mode(cfg.wandb_mode),
                id=wandb_run_id,
                resume="allow" if wandb_run_id else None,
            )
            self.wandb_run_id = self.wandb_run.id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if self._bar is not None:
            shown = {k: metrics[k] for k in ("loss", "lr", "samples_per_s") if k in metrics}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def message(self, text: str) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
