"""The training loop: `train_step` does one optimizer step, `train` decides when to log,
checkpoint and stop. Nothing here knows whether DDP or DeepSpeed runs the model, or in which
dtype: training.parallel (engines, precision) owns those decisions."""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from data_pipeline.errors import UserError
from training import checkpoint as ckpt
from training.parallel.collectives import gather_objects, sum_over_ranks
from training.parallel.process_group import Distributed
from training.optim import OptimConfig, lr_at, set_lr
from training.run_config import CheckpointConfig, TrainConfig
from training.sample_log import SampleLog
from training.run_log import RunLog
from training.data.device_augment import augment_on_device
from training.data.telemetry import data_bound_message
from training.data.transforms import normalize_images


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


def batch_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """A loader batch on the model's device: images normalised there from uint8 (and first
    resized and augmented there, for data.augment_on=device), tokens moved."""
    non_blocking = device.type == "cuda"
    if "augment_params" in batch:
        size = batch["augment_size"]
        images = augment_on_device(batch["image"], batch["augment_params"], size, device)
    else:
        images = normalize_images(batch["image"], device)  # uint8 from the workers
    return {"image": images, "text": batch["text"].to(device, non_blocking=non_blocking)}


def train_step(
    engine,
    micro_batches: list[dict[str, torch.Tensor]],
    loss_fn: Callable[..., torch.Tensor],
    env: Distributed,
    stop: StopSignal | None = None,
) -> StepResult:
    """Forward, loss and backward over the micro-batches, then clip and step, unless the loss
    is non-finite on any rank, in which case every rank skips the update together."""
    engine.zero_grad()
    total_loss = torch.zeros((), device=env.device)
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        with engine.accumulate(last):
            out = engine.forward(batch["image"], batch["text"])
            loss = loss_fn(
                out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias")
            )
            engine.backward(loss, len(micro_batches), last)
        total_loss += loss.detach().float() / len(micro_batches)

    # One small collective per step (all ranks, float tensor [3] in and out): each rank's loss
    # covers only its own rows, so the global loss is the mean over ranks; the flags make every
    # rank skip a non-finite step, or stop for a signal, together. This is the step's host sync.
    local = torch.stack(
        [
            total_loss,
            (~torch.isfinite(total_loss)).float(),
            torch.tensor(float(bool(stop and stop.received)), device=env.device),
        ]
    )
    loss_sum, nonfinite, stop_requested = sum_over_ranks(local, env).tolist()
    grad_norm = engine.finish_step(skip=nonfinite > 0)
    return StepResult(loss_sum / env.world_size, grad_norm, nonfinite == 0, stop_requested > 0)


def _timed_batches(loader, device) -> Iterator[tuple[dict[str, torch.Tensor], float, list[str]]]:
    """(batch on the device, seconds waited for it, its sample keys)."""
    iterator = iter(loader)
    while True:
        started = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        yield batch_to_device(batch, device), time.perf_counter() - started, batch.get("keys", [])


def checkpoint_extras(loader, env, progress, config, wandb_id, tokenizer_json) -> dict:
    """What a checkpoint holds besides model and optimizer; per-rank parts come from every rank."""
    return {
        "rng": gather_objects(ckpt.capture_rng(), env),
        "data": gather_objects(loader.state_dict(), env),
        "config": config,
        "tokenizer": tokenizer_json,
        "wandb_run_id": wandb_id,
        "metrics": progress.as_dict(),
        "world_size": env.world_size,
    }


@dataclass
class MetricsWindow:
    """Step timings and losses since the last metrics record."""

    data_s: float = 0.0
    compute_s: float = 0.0
    steps: int = 0
    finite: int = 0
    loss_sum: float = 0.0

    def add(self, result: StepResult, data_s: float, compute_s: float) -> None:
        self.data_s += data_s
        self.compute_s += compute_s
        self.steps += 1
        if result.finite:
            self.finite += 1
            self.loss_sum += result.loss

    def record(self, *, result: StepResult, lr: float, logit_scale: float, global_batch: int,
               world_size: int, progress: Progress, skipped_samples: int,
               steps_per_epoch: int) -> dict[str, float]:
        """One line of metrics.jsonl (and W&B)."""
        elapsed = self.data_s + self.compute_s
        return {
            "loss": self.loss_sum / self.finite if self.finite else float("nan"),
            "last_loss": result.loss,
            "lr": lr,
            "logit_scale": logit_scale,
            "grad_norm": result.grad_norm,
            "samples_per_s": global_batch * self.steps / elapsed,
            "samples_per_s_per_rank": global_batch // world_size * self.steps / elapsed,
            "data_wait_frac": self.data_s / elapsed,
            "data_s_per_step": self.data_s / self.steps,
            "compute_s_per_step": self.compute_s / self.steps,
            "skipped_samples": float(skipped_samples),
            "skipped_steps": float(progress.skipped_steps),
            "samples_seen": float(progress.samples_seen),
            "epoch": progress.step / max(1, steps_per_epoch),
        }


def count_step(progress: Progress, result: StepResult, global_batch: int, max_nonfinite: int,
               log: RunLog) -> None:
    """Advance the counters; a non-finite step is counted as skipped, and too many in a row end
    the run (NonFiniteLossError) rather than training on from diverged weights."""
    progress.step += 1
    progress.samples_seen += global_batch
    if result.finite:
        progress.nonfinite_in_row = 0
        return
    progress.skipped_steps += 1
    progress.nonfinite_in_row += 1
    log.message(f"step {progress.step}: non-finite loss, update skipped")
    if progress.nonfinite_in_row >= max_nonfinite:
        raise NonFiniteLossError(
            f"{progress.nonfinite_in_row} non-finite losses in a row at step {progress.step}: "
            f"the run diverged; lower optim.lr, raise optim.warmup_steps or use "
            f"engine.precision=fp32"
        )


def logged_logit_scale(engine) -> float:
    """exp(logit_scale) as the loss uses it. An engine that shards parameters (fsdp2) gathers
    it (every rank logs at the same steps, so every rank takes part)."""
    full = getattr(engine, "logit_scale", None)
    value = full() if full is not None else engine.module.logit_scale
    return value.float().exp().clamp(max=100).item()


def periodic_checkpoint_due(step: int, total_steps: int, every: int) -> bool:
    """A checkpoint on the way is due every `every` steps; the last step saves on the way out."""
    return bool(every) and step % every == 0 and step < total_steps


def train(
    *,
    engine,
    loss_fn: Callable[..., torch.Tensor],
    loader,
    env: Distributed,
    train_cfg: TrainConfig,
    checkpoint_cfg: CheckpointConfig,
    optim_cfg: OptimConfig,
    log: RunLog,
    log_every: int,
    total_steps: int,
    progress: Progress,
    config: dict[str, Any],
    global_batch: int,
    tokenizer_json: str,
    evaluate: Callable[[], dict[str, float]] | None = None,
    evaluate_every: int = 0,
    sample_keys: bool = False,
) -> Progress:
    """Run optimizer steps until `total_steps` or a stop signal; checkpoint on the way out."""
    run_dir = Path(train_cfg.run_dir)
    stop = StopSignal()
    batches = _timed_batches(loader, env.device)
    window = MetricsWindow()

    samples = SampleLog(run_dir, env.rank, progress.step) if sample_keys else None

    def save() -> None:
        if samples is not None:
            try:
                samples.flush()
            except OSError as exn:  # the audit log must never cost the checkpoint
                log.message(f"warning: sample log not written ({exn})")
        extras = checkpoint_extras(loader, env, progress, config, log.wandb_run_id, tokenizer_json)
        path = engine.save(run_dir, progress.step, extras, checkpoint_cfg.keep)
        if path is not None:
            log.message(f"checkpoint: {path}")

    first_step = progress.step
    said_skips = said_data_bound = False
    marker = run_dir / "finished.json"
    if env.is_main and progress.step < total_steps and marker.exists():
        marker.unlink()  # resumed with steps left (e.g. a longer schedule): no longer finished
    try:
        while progress.step < total_steps:
            if train_cfg.stop_at_step and progress.step >= train_cfg.stop_at_step:
                break
            lr = lr_at(progress.step, total_steps, optim_cfg)
            set_lr(engine.optimizer, lr)
            micro, data_s = [], 0.0
            for _ in range(train_cfg.accum_steps):
                batch, waited, keys = next(batches)
                micro.append(batch)
                data_s += waited
                if samples is not None:
                    samples.record(progress.step + 1, keys)
            started = time.perf_counter()
            result = train_step(engine, micro, loss_fn, env, stop)
            window.add(result, data_s, time.perf_counter() - started)
            count_step(progress, result, global_batch, train_cfg.max_nonfinite_steps, log)
            log.advance()

            if progress.step % log_every == 0 or progress.step == total_steps:
                scale = logged_logit_scale(engine)
                metrics = window.record(
                    result=result, lr=lr, logit_scale=scale, global_batch=global_batch,
                    world_size=env.world_size, progress=progress,
                    skipped_samples=loader.skipped_samples,
                    steps_per_epoch=loader.steps_per_epoch(global_batch),
                )
                metrics.update(loader.telemetry())
                log.log(progress.step, metrics)
                window = MetricsWindow()
                # Said once, after the first window (warm-up included, so not at the first
                # step, when every run waits for its workers to start).
                bound = data_bound_message(metrics, getattr(loader.cfg, "workers", 1))
                if bound and not said_data_bound and progress.step > first_step + log_every:
                    said_data_bound = True
                    log.message(bound)
                if loader.skipped_samples and not said_skips:
                    said_skips = True
                    log.message(
                        f"note: {loader.skipped_samples} unreadable samples skipped so far; "
                        f"epochs and the LR schedule count the {loader.num_samples} samples of "
                        f"sizes.json (data.num_samples), unreadable ones included"
                    )

            if evaluate and evaluate_every and progress.step % evaluate_every == 0 and env.is_main:
                log.log(progress.step, evaluate())

            if result.stop_requested:
                log.message(f"stop signal received: checkpointing at step {progress.step}")
                break
            if periodic_checkpoint_due(progress.step, total_steps, checkpoint_cfg.every):
                save()
        if progress.step > first_step:  # a finished run that is resumed saves nothing new
            save()
        wait_for_checkpoint = getattr(engine, "wait_for_checkpoint", None)
        if wait_for_checkpoint is not None:
            # An engine that writes in the background (fsdp2): the run, and a stop signal's
            # grace period, end only once the last checkpoint is complete and in place.
            wait_for_checkpoint()
    finally:
        stop.restore()
    if progress.step >= total_steps and env.is_main:
        # Marker for eval watchers (eval.run --watch): no further checkpoint will appear.
        marker.write_text(
            json.dumps({"step": progress.step, "time": time.time()}) + "\n"
        )
    elif env.is_main:
        why = stop.received or f"train.stop_at_step={train_cfg.stop_at_step}"
        log.message(f"stopped at step {progress.step} ({why}); continue with checkpoint.resume=latest")
    return progress


def restore_from_checkpoint(engine, path: Path, env: Distributed, log) -> tuple[Progress, Any, dict]:
    """Load model/optimizer/scaler/RNG through the engine; return the progress counters, every
    rank's data state (the loader continues exactly, or hands the epoch over to a new world
    size) and the raw checkpoint dict."""
    state = engine.load(path)
    progress = Progress(**state["metrics"])
    if state.get("world_size") == env.world_size:
        ckpt.restore_rng(state["rng"][env.rank])
    else:
        log.message(
            f"checkpoint was written by {state.get('world_size')} ranks, resuming on "
            f"{env.world_size}: model and optimizer restored; per-rank RNG streams start afresh"
        )
    return progress, state["data"], state


def check_same_global_batch(state: dict, global_batch: int, path: Path) -> None:
    """A resume keeps the global batch (ranks x data.batch_size x train.accum_steps), whatever
    the world size: steps, epochs and the LR schedule are counted in it."""
    config, world = state.get("config") or {}, state.get("world_size")
    try:
        saved = int(config["data"]["batch_size"]) * int(world) * int(config["train"]["accum_steps"])
    except (KeyError, TypeError, ValueError):
        return  # a checkpoint without the record (older format): nothing to compare
    if saved != global_batch:
        raise UserError(
            f"{path} was trained with global batch {saved} ({world} ranks x data.batch_size "
            f"{config['data']['batch_size']} x train.accum_steps {config['train']['accum_steps']}); "
            f"resuming with {global_batch} would change what a step and an epoch mean: set "
            f"data.batch_size or train.accum_steps so that ranks x both = {saved}"
        )


def total_steps_for(train_cfg: TrainConfig, steps_per_epoch: int) -> int:
    if train_cfg.steps:
        return train_cfg.steps
    return max(1, math.ceil(train_cfg.epochs * steps_per_epoch))
