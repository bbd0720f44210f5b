"""Train a CLIP model on webdataset shards: parse -> build -> train -> close.

    python -m training.main --config configs/tiny_demo.toml [section.key=value ...]
    torchrun --nproc_per_node 2 -m training.main --config configs/tiny_demo.toml

The same code runs as one plain process or as many torchrun/SLURM ranks.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Callable

import torch

from torch import nn

from data_pipeline.errors import UserError
from eval.demo import DemoZeroShot
from training import checkpoint as ckpt
from training.config_loading import ConfigError, to_dict
from training.data import DataError, build_train_loader
from training.data.sources import SOURCE_SEPARATOR
from training.losses import build_loss
from training.model import build_model
from training.model.configs import ClipModelConfig, for_siglip, with_tokenizer
from training.optim import build_optimizer
from training.parallel.engines import build_engine, uses_channels_last
from training.parallel.precision import choose_precision
from training.parallel.process_group import setup_distributed, teardown_distributed
from training.run_config import CheckpointConfig, RunConfig, load_run_config
from training.run_log import RunLog, never_raising_output
from training.text.tokenizer import Tokenizer
from training.train import (
    NonFiniteLossError,
    Progress,
    check_same_global_batch,
    restore_from_checkpoint,
    total_steps_for,
    train,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training.main",
        description="Pre-train a CLIP model on webdataset shards.",
        epilog="Overrides look like data.batch_size=128 train.steps=1000 model.name=vit_s32.",
    )
    parser.add_argument("--config", help="TOML experiment file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value settings applied on top")
    return parser.parse_args(argv)


def build_model_config(cfg: RunConfig, tokenizer: Tokenizer) -> ClipModelConfig:
    """The chosen architecture, fitted to the tokenizer, the data's image size and run options.
    A text tower shorter than the tokenizer's context makes the tokenizer truncate to it."""
    try:
        model_cfg = cfg.model.architecture(cfg.data.image_size)
    except ValueError as exc:
        raise UserError(f"model: {exc}") from None
    if model_cfg.text.context_length < tokenizer.context_length:
        tokenizer.context_length = model_cfg.text.context_length
    model_cfg = with_tokenizer(model_cfg, tokenizer)
    if cfg.loss.name == "siglip" and model_cfg.init_logit_bias is None:
        model_cfg = for_siglip(model_cfg)
    return model_cfg


def resolve_resume(cfg: CheckpointConfig, run_dir: Path) -> Path | None:
    """The checkpoint this run continues from, or None for a fresh start. A run folder that
    already holds checkpoints is never trained over without checkpoint.resume."""
    if cfg.resume == "latest":
        # Single files or sharded folders (engine.name=fsdp2), whichever is newest.
        return ckpt.latest_checkpoint(run_dir, sharded=True)  # none yet: a fresh start, by design
    if cfg.resume:
        path = Path(cfg.resume)
        if not (path.is_file() or (path.is_dir() and path.suffix == ckpt.SHARDED_SUFFIX)):
            raise UserError(f"checkpoint.resume: no checkpoint at {path}")
        return path
    if ckpt.latest_checkpoint(run_dir, sharded=True) is not None:
        raise UserError(
            f"{run_dir} already holds checkpoints; pass checkpoint.resume=latest to continue it "
            f"or choose another train.run_dir (nothing is overwritten)"
        )
    return None


def load_tokenizer(cfg: RunConfig) -> Tokenizer:
    path = cfg.tokenizer_path()
    if not path.is_file():
        first_source = cfg.data.train_shards.split(SOURCE_SEPARATOR)[0]
        raise UserError(
            f"no tokenizer at {path}; train one with `python -m training.text.tokenizer "
            f"--shards {Path(first_source)}` or set tokenizer=PATH"
        )
    return Tokenizer.from_file(path)


ZeroShotHook = Callable[[nn.Module, Tokenizer], dict[str, float]]
# Builds the in-training zero-shot check from (demo root, image size, device); the entry point
# passes eval's, so the training package never imports the eval stage.
MakeZeroShot = Callable[[str, int, torch.device], ZeroShotHook]


def run(cfg: RunConfig, make_zero_shot: MakeZeroShot | None = None) -> Progress:
    env = setup_distributed(cfg.engine.device)
    try:
        if cfg.zeroshot.every and cfg.engine.name == "fsdp2" and env.world_size > 1:
            raise UserError("zeroshot.every runs the model on rank 0 alone, and engine.name=fsdp2 "
                            "shards it over every rank; evaluate its checkpoints with eval.run")
        if cfg.data.augment_on == "device" and env.device.type != "cuda":
            raise UserError(
                f"data.augment_on=device moves the resize and augmentation onto the GPU, and "
                f"this run is on {env.device.type} (no GPU): use data.augment_on=workers")
        torch.manual_seed(cfg.train.seed + env.rank)  # per-rank seed: different patch dropout etc.
        tokenizer = load_tokenizer(cfg)
        model_cfg = build_model_config(cfg, tokenizer)
        model = build_model(model_cfg)
        optimizer = build_optimizer(model, cfg.optim)
        choice = choose_precision(cfg.engine.precision, env.device.type)
        if choice.warning and env.is_main:
            print(choice.warning, file=sys.stderr, flush=True)
        engine_cfg = dataclasses.replace(cfg.engine, precision=choice.name)
        run_dir = Path(cfg.train.run_dir)
        config_dict = {**to_dict(cfg), "engine": to_dict(engine_cfg),
                       "precision_choice": to_dict(choice), "model_config": to_dict(model_cfg)}
        resume_from = resolve_resume(cfg.checkpoint, run_dir)

        global_batch = cfg.data.batch_size * env.world_size * cfg.train.accum_steps
        engine = build_engine(
            engine_cfg, model, optimizer, env, grad_clip=cfg.optim.grad_clip,
            micro_batch=cfg.data.batch_size, accum_steps=cfg.train.accum_steps,
        )
        progress, data_states, wandb_id = Progress(), None, None
        messages = _Messages(env.is_main)
        if resume_from is None and cfg.checkpoint.resume == "latest":
            messages.message(f"checkpoint.resume=latest: no checkpoint in "
                             f"{ckpt.checkpoint_dir(run_dir)} yet, so starting from step 0")
        if resume_from is not None:
            progress, data_states, state = restore_from_checkpoint(engine, resume_from, env, messages)
            check_same_global_batch(state, global_batch, resume_from)
            wandb_id = state.get("wandb_run_id")
            messages.message(f"resumed from {resume_from} at step {progress.step}")

        loader = build_train_loader(
            cfg.data, tokenizer.encode, tokenizer.pad_id, env.rank, env.world_size, data_states
        )
        if loader.resume_note:
            messages.message(loader.resume_note)
        total_steps = total_steps_for(cfg.train, loader.steps_per_epoch(global_batch))
        evaluate = None
        if cfg.zeroshot.every and make_zero_shot is not None:
            hook = make_zero_shot(cfg.zeroshot.demo, cfg.data.image_size, env.device)
            evaluate = lambda: hook(engine.module, tokenizer)  # noqa: E731 - bound to this run
        log = RunLog(cfg.log, run_dir, total_steps, progress.step, config_dict, env.is_main, wandb_id)
        try:
            if env.is_main:
                n_params = sum(p.numel() for p in model.parameters())
                log.message(
                    f"model {cfg.model.label()}: {n_params / 1e6:.2f}M parameters; "
                    f"{env.world_size} rank(s) on {env.device}; global batch {global_batch}; "
                    f"{total_steps} steps; precision {choice.name} ({choice.reason}); "
                    f"engine {cfg.engine.name}"
                    + ("; channels_last" if uses_channels_last(engine_cfg) else "")
                )
            return train(
                engine=engine,
                loss_fn=build_loss(cfg.loss),
                loader=loader,
                env=env,
                train_cfg=cfg.train,
                checkpoint_cfg=cfg.checkpoint,
                optim_cfg=cfg.optim,
                log=log,
                log_every=cfg.log.every,
                total_steps=total_steps,
                progress=progress,
                config=config_dict,
                global_batch=global_batch,
                tokenizer_json=tokenizer.to_json(),
                evaluate=evaluate,
                evaluate_every=cfg.zeroshot.every,
                sample_keys=cfg.log.sample_keys,
            )
        finally:
            log.close()
    finally:
        teardown_distributed()


class _Messages:
    """Prints on the main rank only, before the run log exists."""

    def __init__(self, is_main: bool):
        self.is_main = is_main

    def message(self, text: str) -> None:
        if self.is_main:
            with never_raising_output():
                print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.overrides)
        run(cfg, make_zero_shot=DemoZeroShot)
    except (UserError, ConfigError, DataError, NonFiniteLossError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
