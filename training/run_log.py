"""Where training metrics go: `RUN_DIR/metrics.jsonl` (always), W&B (optional), a tqdm bar.

Only rank 0 writes. W&B runs offline when no API key is configured, so a laptop or an air-gapped
cluster logs locally and `wandb sync` uploads later. A resumed run passes the W&B run id saved in
its checkpoint, so its curves continue the same W&B run instead of starting a new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from tqdm import tqdm

from training.wandb_setup import start_wandb_run


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
    sample_keys: bool = False  # RUN_DIR/sample_keys/: which samples each step took (sample_log.py)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"log.every must be >= 1, got {self.every}")


@contextlib.contextmanager
def never_raising_output() -> Iterator[None]:
    """Console output that can never stop the run. `trainer | tee log` under a signal to the
    whole process group (Ctrl-C, scancel, SLURM pre-emption) kills the reader first, and the next
    print raises BrokenPipeError, which used to end the run before its stop checkpoint. A broken
    stream is pointed at /dev/null (Python's documented recipe), so later writes, and the
    interpreter's final flush, go nowhere instead of raising; metrics.jsonl is unaffected."""
    try:
        yield
    except (BrokenPipeError, ConnectionResetError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (BrokenPipeError, ConnectionResetError, ValueError):
                try:
                    os.dup2(devnull, stream.fileno())
                except (OSError, ValueError):
                    pass
        os.close(devnull)


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
            self.wandb_run = start_wandb_run(
                cfg.wandb_mode,
                project=cfg.wandb_project,
                entity=cfg.wandb_entity,
                name=cfg.run_name or run_dir.name,
                tags=cfg.tags,
                config=config,
                dir=str(run_dir),
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
            with never_raising_output():
                self._bar.update(steps)

    def message(self, text: str) -> None:
        if not self.is_main:
            return
        with never_raising_output():
            if self._bar is not None:
                self._bar.write(text)
            else:
                print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            with never_raising_output():
                self._bar.close()
        if self._file is not None:
            self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
