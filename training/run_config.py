"""The full configuration of a training run: one typed section per component.

A run is described by a TOML file under `configs/` (each starts with a comment saying how to launch
it and what it should reach) plus `section.key=value` overrides on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from training.config_loading import ConfigError, from_dict, load_tree
from training.data import DataConfig
from training.data.sources import SOURCE_SEPARATOR
from training.parallel.engines import EngineConfig
from training.losses import LossConfig
from training.model.choice import ModelChoice
from training.optim import OptimConfig
from training.run_log import LogConfig


@dataclass
class TrainConfig:
    """The schedule and the loop: how long, in which steps, when to give up."""

    run_dir: str = "runs/default"
    steps: int = 0  # optimizer steps; 0 means epochs x steps per epoch
    epochs: float = 1.0
    accum_steps: int = 1  # micro-batches per optimizer step (each is its own contrastive batch)
    seed: int = 0
    max_nonfinite_steps: int = 5  # abort after this many non-finite losses in a row
    # Stop (with a checkpoint) once this step is reached, leaving the schedule as if the run went
    # on: for clusters that hand out fixed time slices, and for resume tests. 0 = run to the end.
    stop_at_step: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError("train.steps must be >= 0")
        if self.steps == 0 and self.epochs <= 0:
            raise ValueError("set train.steps or a positive train.epochs")
        if self.accum_steps < 1:
            raise ValueError("train.accum_steps must be >= 1")
        if self.max_nonfinite_steps < 1:
            raise ValueError("train.max_nonfinite_steps must be >= 1")


@dataclass
class CheckpointConfig:
    """When checkpoints are written, how many are kept, and where a run resumes from."""

    every: int = 0  # steps; 0 = only at the end (and on a stop signal)
    keep: int = 3
    resume: str | None = None  # "latest" or a checkpoint path

    def __post_init__(self) -> None:
        if self.every < 0 or self.keep < 1:
            raise ValueError("checkpoint.every must be >= 0 and checkpoint.keep >= 1")


@dataclass
class ZeroShotConfig:
    """The optional in-training zero-shot check on the demo corpus (eval.demo), rank 0 only,
    every N steps; the other ranks wait at the next step's collective, far inside its timeout."""

    every: int = 0  # steps; 0 = off
    demo: str = ""  # demo corpus root (with corpus.json, val/, heldout/)

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError("zeroshot.every must be >= 0")
        if self.every and not self.demo:
            raise ValueError("zeroshot.every needs zeroshot.demo=DEMO_ROOT")


@dataclass
class RunConfig:
    data: DataConfig
    tokenizer: str = ""  # path to tokenizer.json; empty = tokenizer.json beside the train shards
    model: ModelChoice = field(default_factory=ModelChoice)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        if self.zeroshot.every and self.engine.name == "deepspeed" and self.engine.zero_stage == 3:
            raise ValueError("zeroshot.every needs the whole model on rank 0; not with ZeRO-3")

    def tokenizer_path(self) -> Path:
        if self.tokenizer:
            return Path(self.tokenizer)
        first_source = self.data.train_shards.split(SOURCE_SEPARATOR)[0]
        folder = Path(first_source)
        if not folder.is_dir():
            folder = folder.parent
        # The demo layout keeps the tokenizer one level up, beside train/ val/ heldout/.
        for candidate in (folder / "tokenizer.json", folder.parent / "tokenizer.json"):
            if candidate.is_file():
                return candidate
        return folder / "tokenizer.json"


# Keys that lived in [train] before each component got its own section.
MOVED_KEYS = {
    "train." + key: new for key, new in {
        "precision": "engine.precision", "device": "engine.device", "compile": "engine.compile",
        "attention": "engine.attention", "checkpoint_every": "checkpoint.every",
        "keep_checkpoints": "checkpoint.keep", "resume": "checkpoint.resume",
        "zeroshot_every": "zeroshot.every", "zeroshot_demo": "zeroshot.demo",
    }.items()
}


def load_run_config(config_path: str | None, overrides: list[str]) -> RunConfig:
    tree = load_tree(config_path, overrides)
    for old, new in MOVED_KEYS.items():
        section, key = old.split(".")
        if key in tree.get(section, {}):
            raise ConfigError(f"{old} is now {new} (each component has its own section)")
    tree.setdefault("data", {})
    return from_dict(RunConfig, tree)
