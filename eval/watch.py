"""Evaluate each checkpoint of a training run as it appears, exactly once, until the run ends.

    loop: list RUN_DIR/checkpoints/step_*.pt or .dcp (oldest first; only finished ones are listed,
          the trainer writes them atomically), evaluate every one whose suites are not all in
          OUT/done.json, then
          - RUN_DIR/finished.json exists (the trainer writes it after its final checkpoint)
            and names a step no older than the newest checkpoint: stop;
          - no new checkpoint for `max_wait` seconds: stop (a crashed or paused run);
          - else sleep `poll` seconds.

Checkpoints the trainer rotates away (checkpoint.keep) before their turn are reported and
skipped; raise keep_checkpoints if the watcher falls behind. One watcher per output folder: a
lock file with the owner's pid refuses a second one (a stale lock from a dead process is taken
over).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from data_pipeline.errors import UserError
from eval.sharding import agree
from training.checkpoint import evaluable_checkpoints

FINISHED_MARKER = "finished.json"
LOCK_FILE = "watch.lock"


@dataclass
class WatchConfig:
    run_dir: Path
    poll_seconds: float = 30.0
    max_wait: float | None = None  # seconds without a new checkpoint; None = until finished

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        if not self.run_dir.is_dir():
            raise UserError(f"--watch {self.run_dir}: no such run folder (expected a training "
                            f"run_dir with checkpoints/ inside, or one that will get it)")
        if self.poll_seconds <= 0:
            raise UserError(f"--poll must be > 0 seconds, got {self.poll_seconds}")
        if self.max_wait is not None and self.max_wait < 0:
            raise UserError(f"--max-wait must be >= 0 seconds, got {self.max_wait}")


class WatchLock:
    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / LOCK_FILE

    def __enter__(self) -> WatchLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and _alive(owner):
                    raise UserError(f"another watcher (pid {owner}) is evaluating into "
                                    f"{self.path.parent}; stop it or remove {self.path}") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(str(os.getpid()))
            return self
        raise UserError(f"could not take the lock {self.path}")

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc: object) -> None:
        if self._owner() == os.getpid():
            self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def watch(
    cfg: WatchConfig,
    pending: Callable[[Path], list[str]],
    evaluate: Callable[[Path], object],
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Run the loop; returns how many checkpoints were evaluated. `pending(ckpt)` lists the
    suites not yet done for a checkpoint; `evaluate(ckpt)` does them and records them."""
    evaluated = 0
    last_news = time.monotonic()
    while True:
        # Sharded (torchrun): every decision is rank 0's, so all ranks evaluate the same things.
        marker_step = agree(_finished_step(cfg.run_dir))  # read before listing: see below
        checkpoints = agree(evaluable_checkpoints(cfg.run_dir))
        for checkpoint in checkpoints:
            if not agree(bool(pending(checkpoint))):
                continue
            try:
                evaluate(checkpoint)
            except FileNotFoundError:
                print(f"{checkpoint.name}: deleted before it could be evaluated (the trainer keeps "
                      f"only its newest checkpoints; raise checkpoint.keep)", flush=True)
                continue
            evaluated += 1
            last_news = time.monotonic()
        # The marker is written after the final checkpoint, so a listing made after seeing it
        # holds every checkpoint the run will have. A marker older than the newest checkpoint
        # is left over from before a resumed run went on: not the end.
        newest = int(checkpoints[-1].stem[len("step_"):]) if checkpoints else -1
        if marker_step is not None and marker_step >= newest:
            print(f"{cfg.run_dir}: training finished; {evaluated} checkpoint(s) evaluated", flush=True)
            return evaluated
        if agree(cfg.max_wait is not None and time.monotonic() - last_news >= cfg.max_wait):
            print(f"{cfg.run_dir}: no new checkpoint for {cfg.max_wait:g} s; stopping "
                  f"({evaluated} evaluated)", flush=True)
            return evaluated
        sleep(cfg.poll_seconds)


def _finished_step(run_dir: Path) -> int | None:
    """The step in RUN_DIR/finished.json, or None while training goes on. A marker without a
    readable step counts as the end of everything listed (step = infinity)."""
    path = run_dir / FINISHED_MARKER
    if not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1 << 62
