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

import torch

from data_pipeline.errors import UserError
from training import checkpoint as ckpt
from training.config_loading import ConfigError, to_dict
from training.data import DataError, build_train_loader
from training.engines import build_engine
from training.process_group import setup_distributed, teardown_distributed
from training.losses import build_loss
from training.model import build_model
from training.model.configs import MODEL_CONFIGS, ClipModelConfig, for_siglip, with_tokenizer
from training.optim import build_optimizer
from training.precision import Precision
from training.run_config import RunConfig, load_run_config
from training.run_log import RunLog
from training.tokenizer import Tokenizer
from training.train import (
    NonFiniteLossError,
    Progress,
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
    """The named architecture, fitted to the tokenizer, the data's image size and run options."""
    model_cfg = with_tokenizer(MODEL_CONFIGS[cfg.model.name](), tokenizer)
    vision = dataclasses.replace(
        model_cfg.vision,
        image_size=cfg.data.image_size,
        patch_dropout=cfg.model.patch_dropout,
        pretrained_path=cfg.model.image_pretrained_path,
    )
    model_cfg = dataclasses.replace(
        model_cfg,
        vision=vision,
        lock_image=cfg.model.lock_image,
        lock_text=cfg.model.lock_text,
        grad_checkpointing=cfg.model.grad_checkpointing,
    )
    if cfg.loss.name == "siglip" and model_cfg.init_logit_bias is None:
        model_cfg = for_siglip(model_cfg)
    return model_cfg


def run(cfg: RunConfig) -> Progress:
    env = setup_distributed(cfg.train.device)
    try:
        torch.manual_seed(cfg.train.seed + env.rank)  # per-rank seed: different patch dropout etc.
        tok_path = cfg.tokenizer_path()
        if not tok_path.is_file():
            raise UserError(
                f"no tokenizer at {tok_path}; train one with `python -m training.tokenizer "
                f"--shards {Path(cfg.data.train_shards.split('::')[0])}` or set tokenizer=PATH"
            )
        tokenizer = Tokenizer.from_file(tok_path)
        model_cfg = build_model_config(cfg, tokenizer)
        model = build_model(model_cfg)
        attention = cfg.train.attention
        model.set_fused_attention(
            attention == "fused" or (attention == "auto" and env.device.type == "cuda")
        )
        precision = Precision(cfg.train.precision, "cuda" if env.device.type == "cuda" else "cpu")
        optimizer = build_optimizer(model, cfg.optim)
        run_dir = Path(cfg.train.run_dir)
        config_dict = {**to_dict(cfg), "model_config": to_dict(model_cfg)}

        resume_from = None
        if cfg.train.resume == "latest":
            resume_from = ckpt.latest_checkpoint(run_dir)  # none yet: a fresh start, by design
        elif cfg.train.resume:
            resume_from = Path(cfg.train.resume)
            if not resume_from.is_file():
                raise UserError(f"train.resume: no checkpoint at {resume_from}")
        elif ckpt.latest_checkpoint(run_dir) is not None:
            raise UserError(
                f"{run_dir} already holds checkpoints; pass train.resume=latest to continue it "
                f"or choose another train.run_dir (nothing is overwritten)"
            )

        global_batch = cfg.data.batch_size * env.world_size * cfg.train.accum_steps
        engine = build_engine(
            cfg.engine, model, optimizer, precision, env, cfg.optim.grad_clip, cfg.train.compile,
            cfg.data.batch_size, cfg.train.accum_steps,
        )
        progress, data_state, wandb_id = Progress(), None, None
        messages = _Messages(env.is_main)
        if resume_from is not None:
            progress, data_state, state = restore_from_checkpoint(engine, resume_from, env, messages)
            wandb_id = state.get("wandb_run_id")
            messages.message(f"resumed from {resume_from} at step {progress.step}")

        loader = build_train_loader(
            cfg.data, tokenizer.encode, tokenizer.pad_id, env.rank, env.world_size, data_state
        )
        total_steps = total_steps_for(cfg.train, loader.steps_per_epoch(global_batch))
        loss_fn = build_loss(cfg.loss)
        log = RunLog(cfg.log, run_dir, total_steps, progress.step, config_dict, env.is_main, wandb_id)
        try:
            if env.is_main:
                n_params = sum(p.numel() for p in model.parameters())
                log.message(
                    f"model {cfg.model.name}: {n_params / 1e6:.2f}M parameters; "
                    f"{env.world_size} rank(s) on {env.device}; global batch {global_batch}; "
                    f"{total_steps} steps; precision {cfg.train.precision}; engine {cfg.engine.name}"
                )
            return train(
                engine=engine,
                loss_fn=loss_fn,
                loader=loader,
                env=env,
                train_cfg=cfg.train,
                optim_cfg=cfg.optim,
                log=log,
                log_every=cfg.log.every,
                total_steps=total_steps,
                progress=progress,
                config=config_dict,
                global_batch=global_batch,
                tokenizer_json=tokenizer.to_json(),
                evaluate=_demo_zero_shot(cfg, engine, tokenizer, env),
            )
        finally:
            log.close()
    finally:
        teardown_distributed()


def _demo_zero_shot(cfg: RunConfig, engine, tokenizer: Tokenizer, env):
    """The optional in-training check (train.zeroshot_every), run on rank 0 only."""
    if not cfg.train.zeroshot_every:
        return None
    if cfg.engine.name == "deepspeed" and cfg.engine.zero_stage == 3:
        raise UserError("train.zeroshot_every needs the whole model on rank 0; not with ZeRO-3")
    from eval.demo import zero_shot_during_training

    def evaluate() -> dict[str, float]:
        return zero_shot_during_training(
            engine.module, tokenizer, cfg.train.zeroshot_demo, cfg.data.image_size, device=env.device
        )

    return evaluate


class _Messages:
    """Prints on the main rank only, before the run log exists."""

    def __init__(self, is_main: bool):
        self.is_main = is_main

    def message(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.overrides)
        run(cfg)
    except (UserError, ConfigError, DataError, NonFiniteLossError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
