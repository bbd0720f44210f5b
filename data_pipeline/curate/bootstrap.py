"""A filter model without a pretrained CLIP: train a small one on a trusted seed set first.

Data Filtering Networks (Fang et al. 2023) showed that the model that filters a pool need not
be a good CLIP itself, only one trained on high-quality pairs: a filter trained on a trusted
set scores how well a pool pair "looks like" trusted data. Users without a large teacher (and
this offline demo) get the embedding-based steps that way: `--bootstrap SEED_SHARDS` trains a
CLIP with our own trainer (`training.main`, any run TOML, `--bootstrap-config`) on the seed
shards, and that checkpoint then embeds the pool for the alignment filter, embedding dedup and
decontamination.

The filter run lives in OUT/_work/filter/ and is resumed (`checkpoint.resume=latest`), so an
interrupted curation does not retrain from scratch and a finished one does not retrain at all.
It is a plain one-process run: the torchrun variables of a curation job are not passed on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.curate.sidecars import WORK_DIR
from data_pipeline.errors import UserError

_DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                    "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


@dataclass(frozen=True)
class BootstrapConfig:
    """seed_shards: a folder of trusted shards (None = no bootstrap). config: the run TOML of
    the filter model. overrides: extra `section.key=value` settings for it."""

    seed_shards: str | None = None
    config: Path = Path("configs/tiny_demo.toml")
    overrides: tuple[str, ...] = ()

    @property
    def on(self) -> bool:
        return self.seed_shards is not None

    def __post_init__(self) -> None:
        if not self.on:
            return
        if not Path(self.seed_shards).is_dir():
            raise UserError(f"--bootstrap {self.seed_shards}: not a folder of shards")
        if not Path(self.config).is_file():
            raise UserError(f"--bootstrap-config {self.config}: no such file")
        for item in self.overrides:
            if "=" not in item:
                raise UserError(f"--bootstrap-set {item!r}: expected section.key=value")


def _run(args: list[str], what: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in _DISTRIBUTED_ENV}
    result = subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise UserError(f"{what} failed (exit {result.returncode}): {last}")


def filter_run_dir(out: Path) -> Path:
    return Path(out) / WORK_DIR / "filter" / "run"


def train_filter_model(cfg: BootstrapConfig, out: Path) -> Path:
    """Train (or resume, or find finished) the filter CLIP; -> its run folder."""
    work = Path(out) / WORK_DIR / "filter"
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = work / "tokenizer.json"
    if not tokenizer.is_file():
        partial = work / "tokenizer.json.partial"
        _run(["training.text.tokenizer", "--shards", str(cfg.seed_shards), "--out", str(partial)],
             "training the filter model's tokenizer on the seed shards")
        os.replace(partial, tokenizer)
    run_dir = filter_run_dir(out)
    _run(["training.main", "--config", str(cfg.config), f"data.train_shards={cfg.seed_shards}",
          f"train.run_dir={run_dir}", f"tokenizer={tokenizer}", "checkpoint.resume=latest",
          "log.progress_bar=false", *cfg.overrides],
         f"training the filter model on {cfg.seed_shards}")
    return run_dir
