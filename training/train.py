"""The training loop: `train_step` does one optimizer step, `train` decides when to log,
checkpoint and stop. Nothing here knows whether the model is wrapped in DDP or compiled, or which
dtype autocast uses: engine.py and precision.py own those decisions."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from training import checkpoint as ckpt
from training.engine import Distributed, sum_over_ranks, gather_objects, unwrap_model
from training.optim import OptimConfig, lr_at, set_lr
from training.precision import Precision
from training.run_config import TrainConfig
from training.run_log import RunLog


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run has diverged."""


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    finite: bool
    stop_requested: bool


@dataclass
class Progress:
    """Counters that survive a restart (saved in every checkpoint)."""

    step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0
    nonfinite_in_row: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class StopSignal:
    """Turns SIGTERM / SIGUSR1 (SLURM's pre-emption warning) into a flag the loop polls, so the
    run stops between steps with a checkpoint instead of dying mid-step."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    non_blocking = device.type == "cuda"
    return {
        "image": batch["image"].to(device, non_blocking=non_blocking),
        "text": batch["text"].to(device, non_blocking=non_blocking),
    }


def train_step(
    model: nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    loss_fn: Callable[..., torch.Tensor],
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    grad_clip: float,
    env: Distributed,
    stop: StopSignal | None = None,
) -> StepResult:
    """Forward, loss, backward over the micro-batches, then clip and step, unless the loss is
    non-finite on any rank, in which case every rank skips the update together."""
    optimizer.zero_grad(set_to_none=True)
    scaler = precision.scaler
    total_loss = torch.zeros((), device=env.device)
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        # Accumulating micro-batches: only the last backward all-reduces gradients under DDP.
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with precision.autocast():
                out = model(batch["image"], batch["text"])
            loss = loss_fn(
                out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias")
            )
            scaler.scale(loss / len(micro_batches)).backward()
        total_loss += loss.detach() / len(micro_batches)

    # One small collective per step (all ranks, float tensor [3] in and out): each rank's loss
    # covers only its own rows, so the global loss is the mean over ranks; the flags make every
    # rank skip a non-finite step, or stop for a signal, together. This is the step's host sync.
    local = torch.stack(
        [
            total_loss.float(),
            (~torch.isfinite(total_loss)).float(),
            torch.tensor(float(bool(stop and stop.received)), device=env.device),
        ]
    )
    loss_sum, nonfinite, stop_requested = sum_over_ranks(local, env).tolist()
    global_loss = loss_sum / env.world_size
    if nonfinite:
        optimizer.zero_grad(set_to_none=True)
        return StepResult(global_loss, float("nan"), False, stop_requested > 0)

    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    scaler.step(optimizer)
    scaler.update()
    return StepResult(global_loss, float(grad_norm), True, stop_requested > 0)


def _timed_batches(loader, device) -> Iterator[tuple[dict[str, torch.Tensor], float]]:
    iterator = iter(loader)
    while True:
        started = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        yield _to_device(batch, device), time.perf_counter() - started


def checkpoint_state(
    model, optimizer, precision, loader, env, progress, config, wandb_id, tokenizer_json
) -> dict:
    """Everything needed to continue exactly; per-rank parts are gathered from every rank."""
    rng_states = gather_objects(ckpt.capture_rng(), env)
    data_states = gather_objects(loader.state_dict(), env)
    return {
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": precision.scaler.state_dict(),
        "rng": rng_states,
        "data": data_states,
        "config": config,
        "tokenizer": tokenizer_json,
        "wandb_run_id": wandb_id,
        "metrics": progress.as_dict(),
        "world_size": env.world_size,
    }


def train(
    *,
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    loader,
    env: Distributed,
    train_cfg: TrainConfig,
    optim_cfg: OptimConfig,
    log: RunLog,
    log_every: int,
    total_steps: int,
    progress: Progress,
    config: dict[str, Any],
    global_batch: int,
    tokenizer_json: str,
) -> Progress:
    """Run optimizer steps until `total_steps` or a stop signal; checkpoint on the way out."""
    run_dir = Path(train_cfg.run_dir)
    stop = StopSignal()
    batches = _timed_batches(loader, env.device)
    window = {"data_s": 0.0, "compute_s": 0.0, "steps": 0, "finite": 0, "loss": 0.0}

    def save() -> None:
        state = checkpoint_state(
            model, optimizer, precision, loader, env, progress, config, log.wandb_run_id,
            tokenizer_json,
        )
        if env.is_main:
            path = ckpt.save_checkpoint(run_dir, progress.step, state, train_cfg.keep_checkpoints)
            log.message(f"checkpoint: {path}")

    first_step = progress.step
    try:
        while progress.step < total_steps:
            if train_cfg.stop_at_step and progress.step >= train_cfg.stop_at_step:
                break
            lr = lr_at(progress.step, total_steps, optim_cfg)
            set_lr(optimizer, lr)
            micro, data_s = [], 0.0
            for _ in range(train_cfg.accum_steps):
                batch, waited = next(batches)
                micro.append(batch)
                data_s += waited
            started = time.perf_counter()
            result = train_step(
                model, micro, loss_fn, optimizer, precision, optim_cfg.grad_clip, env, stop
            )
            compute_s = time.perf_counter() - started

            progress.step += 1
            progress.samples_seen += global_batch
            if result.finite:
                progress.nonfinite_in_row = 0
                window["loss"] += result.loss
                window["finite"] += 1
            else:
                progress.skipped_steps += 1
                progress.nonfinite_in_row += 1
                log.message(f"step {progress.step}: non-finite loss, update skipped")
                if progress.nonfinite_in_row >= train_cfg.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{progress.nonfinite_in_row} non-finite losses in a row at step "
                        f"{progress.step}: the run diverged; lower optim.lr, raise "
                        f"optim.warmup_steps or use train.precision=fp32"
                    )
            window["data_s"] += data_s
            window["compute_s"] += compute_s
            window["steps"] += 1
            log.advance()

            if progress.step % log_every == 0 or progress.step == total_steps:
                elapsed = window["data_s"] + window["compute_s"]
                local_batch = global_batch // env.world_size
                scale = unwrap_model(model).logit_scale.exp().clamp(max=100).item()
                log.log(
                    progress.step,
                    {
                        "loss": window["loss"] / window["finite"] if window["finite"] else float("nan"),
                        "last_loss": result.loss,
                        "lr": lr,
                        "logit_scale": scale,
                        "grad_norm": result.grad_norm,
                        "samples_per_s": global_batch * window["steps"] / elapsed,
                        "samples_per_s_per_rank": local_batch * window["steps"] / elapsed,
                        "data_wait_frac": window["data_s"] / elapsed,
                        "data_s_per_step": window["data_s"] / window["steps"],
                        "compute_s_per_step": window["compute_s"] / window["steps"],
                        "skipped_samples": float(loader.skipped_samples),
                        "skipped_steps": float(progress.skipped_steps),
                        "samples_seen": float(progress.samples_seen),
                        "epoch": progress.step / max(1, loader.steps_per_epoch(global_batch)),
                    },
                )
                window = {"data_s": 0.0, "compute_s": 0.0, "steps": 0, "finite": 0, "loss": 0.0}

            if result.stop_requested:
                log.message(f"stop signal received: checkpointing at step {progress.step}")
                break
            if train_cfg.checkpoint_every and progress.step % train_cfg.checkpoint_every == 0:
                if progress.step < total_steps:
                    save()
        if progress.step > first_step:  # a finished run that is resumed saves nothing new
            save()
    finally:
        stop.restore()
    if progress.step >= total_steps and env.is_main:
        # Marker for eval watchers (eval.run --watch): no further checkpoint will appear.
        (run_dir / "finished.json").write_text(
            json.dumps({"step": progress.step, "time": time.time()}) + "\n"
        )
    elif env.is_main:
        why = stop.received or f"train.stop_at_step={train_cfg.stop_at_step}"
        log.message(f"stopped at step {progress.step} ({why}); continue with train.resume=latest")
    return progress


def restore_from_checkpoint(state, model, optimizer, precision, env, log) -> tuple[Progress, Any]:
    """Load model/optimizer/scaler/RNG; return the progress counters and this rank's data state."""
    unwrap_model(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if state["scaler"]:
        precision.scaler.load_state_dict(state["scaler"])
    progress = Progress(**state["metrics"])
    data_state = None
    if state.get("world_size") == env.world_size:
        ckpt.restore_rng(state["rng"][env.rank])
        data_state = state["data"][env.rank]
    else:
        log.message(
            f"checkpoint was written by {state.get('world_size')} ranks, resuming on "
            f"{env.world_size}: model and optimizer restored, data order starts afresh"
        )
    return progress, data_state


def total_steps_for(train_cfg: TrainConfig, steps_per_epoch: int) -> int:
    if train_cfg.steps:
        return train_cfg.steps
    return max(1, math.ceil(train_cfg.epochs * steps_per_epoch))
