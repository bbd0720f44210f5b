"""The `deepspeed` engine: DeepSpeed's engine with ZeRO stage 0-3, bf16 or fp16 weights, its own
gradient accumulation and clipping, and its own (sharded) checkpoints under RUN_DIR/deepspeed/.
Beside each, rank 0 writes a model-only file in our format to RUN_DIR/checkpoints/, so eval jobs
and `checkpoint.resume=latest` find every run's checkpoints the same way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from data_pipeline.errors import UserError
from training import checkpoint as ckpt
from training.config_loading import read_json_file
from training.parallel.process_group import Distributed


def deepspeed_config(
    user_json: str, zero_stage: int, precision: str, *, micro_batch: int, accum_steps: int,
    grad_clip: float,
) -> dict:
    """The DeepSpeed JSON, with batch geometry and clipping taken from our config."""
    if user_json:
        path = Path(user_json)
        ds = read_json_file(path, "engine.deepspeed_config")
        owned = [k for k in ("optimizer", "scheduler") if k in ds]
        if owned:
            raise UserError(
                f"{path}: remove the {' and '.join(owned)} section(s); the optimizer and LR "
                f"schedule come from the optim section of the run config"
            )
        # One source for precision: the run's (what the log and checkpoint record). The JSON
        # may restate it; a JSON that says otherwise is a conflict, not a silent override.
        says = [k for k in ("bf16", "fp16") if ds.get(k, {}).get("enabled")]
        json_precision = says[0] if len(says) == 1 else ("fp32" if not says else "bf16+fp16")
        stated = [k for k in ("bf16", "fp16") if "enabled" in ds.get(k, {})]
        if stated and json_precision != precision:
            raise UserError(
                f"{path} sets precision {json_precision} but engine.precision is {precision}; "
                f"set engine.precision={json_precision} or drop the JSON's bf16/fp16 sections"
            )
        for half in ("bf16", "fp16"):
            ds.setdefault(half, {})["enabled"] = precision == half
    else:
        ds = {
            "zero_optimization": {"stage": zero_stage},
            "bf16": {"enabled": precision == "bf16"},
            "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        }
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage == 0 and precision != "fp16":
        # Without ZeRO's partitioned optimizer or fp16's loss scaler nothing in DeepSpeed checks
        # gradients for inf/NaN, so the trainer's "update skipped" would be a lie: AdamW would
        # apply a non-finite step. Refused rather than trained on.
        raise UserError(
            f"DeepSpeed ZeRO stage 0 in {precision} never skips a non-finite step; use "
            f"engine.zero_stage=1 (or 2, 3), engine.precision=fp16, or engine.name=ddp"
        )
    half = next((k for k in ("bf16", "fp16") if ds.get(k, {}).get("enabled")), None)
    if half:
        # DeepSpeed 0.19 casts parameters but keeps buffers fp32 unless told otherwise, and a
        # BatchNorm (tiny_cnn, rn50) then meets bf16 weights with fp32 running statistics and
        # fails. Casting buffers with the weights is what module.bfloat16() did before 0.19.
        ds.setdefault("data_types", {}).setdefault("buffer_dtype", half)
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds["gradient_accumulation_steps"] = accum_steps
    ds["gradient_clipping"] = grad_clip
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and world size
    ds.setdefault("steps_per_print", 10**9)  # our run log reports progress
    # Our AdamW with its weight-decay groups is a plain torch optimizer, which ZeRO handles.
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds


class DeepSpeedEngine:
    def __init__(self, model, optimizer, env: Distributed, ds_config: dict):
        import deepspeed  # lazy: slow to import and only needed for this engine

        backend = "nccl" if env.device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            # One process started without torchrun (`python -m training.main`): DeepSpeed would
            # look for MPI (failing on a missing mpi4py), and asserts that LOCAL_RANK is set.
            # A one-rank group needs no rendezvous; LOCAL_RANK is what torchrun would have set.
            os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        # Reuses the process group setup_distributed made (gloo on CPU, NCCL on GPUs).
        deepspeed.init_distributed(dist_backend=backend)
        self._scalars = _scalars_as_vectors(model)
        self.env = env
        self.ds_config = ds_config
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config
        )
        self.module = self.engine.module
        self.wrapped = self.engine
        if ds_config.get("bf16", {}).get("enabled"):
            self.input_dtype = torch.bfloat16
        elif ds_config.get("fp16", {}).get("enabled"):
            self.input_dtype = torch.float16
        else:
            self.input_dtype = torch.float32

    def zero_grad(self) -> None:
        pass  # DeepSpeed clears gradients itself after each optimizer step

    def accumulate(self, last: bool):
        return contextlib.nullcontext()  # DeepSpeed accumulates and reduces at its boundary

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        # DeepSpeed keeps bf16/fp16 weights (no autocast), so images enter in that dtype.
        return self.engine(image.to(self.input_dtype), text)

    def backward(self, loss: torch.Tensor, n_micro: int, last: bool) -> None:
        self.engine.backward(loss)  # scales by 1/gradient_accumulation_steps itself
        if not last:
            self.engine.step()  # inside an accumulation window this only advances its counter

    def finish_step(self, skip: bool) -> float:
        # ZeRO checks gradients for inf/NaN on every rank and skips the update itself, so a
        # non-finite loss (which gives non-finite gradients) is skipped there as well.
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def _model_state_fp32(self) -> dict[str, torch.Tensor]:
        if self.ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
            # Parameters are sharded across ranks: every rank takes part in gathering them.
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.module.state_dict()
        state = {k: v.float() if v.is_floating_point() else v for k, v in (state or {}).items()}
        return {k: v.reshape(()) if k in self._scalars else v for k, v in state.items()}

    def save(self, run_dir: Path, step: int, extra: dict[str, Any], keep: int) -> Path | None:
        tag = f"step_{step:08d}"
        ds_dir = run_dir / "deepspeed"
        # Every rank writes its own optimizer shard; client_state rides in rank 0's model file.
        self.engine.save_checkpoint(str(ds_dir), tag=tag, client_state={"extra_keys": sorted(extra)})
        model_state = self._model_state_fp32()
        if not self.env.is_main:
            return None
        state = {"engine": "deepspeed", "deepspeed_tag": tag, "model": model_state,
                 "optimizer": {}, "scaler": {}, **extra}
        path = ckpt.save_checkpoint(run_dir, step, state, keep)
        kept = {p.stem for p in ckpt.list_checkpoints(run_dir)}
        for old in ds_dir.glob("step_*"):
            if old.is_dir() and old.name not in kept:
                shutil.rmtree(old, ignore_errors=True)
        return path

    def load(self, path: Path) -> dict[str, Any]:
        state = ckpt.load_checkpoint(path)
        if state.get("engine") != "deepspeed":
            raise UserError(f"{path} was written by the ddp engine; resume with engine.name=ddp")
        ds_dir = path.parent.parent / "deepspeed"
        tag = state["deepspeed_tag"]
        universal = state.get("world_size") != self.env.world_size
        if universal:  # ZeRO's shards are cut for the old world size: go through DeepSpeed's
            tag = self._universal_tag(ds_dir, tag)  # universal format, which any size loads
        config = self.engine._config
        config.load_universal_checkpoint = universal
        try:
            loaded, _ = self.engine.load_checkpoint(str(ds_dir), tag=tag)
        finally:
            config.load_universal_checkpoint = False
        if loaded is None:
            raise UserError(f"DeepSpeed checkpoint {ds_dir / state['deepspeed_tag']} is missing or incomplete")
        return state


    def _universal_tag(self, ds_dir: Path, tag: str) -> str:
        """Convert ds_dir/tag to ds_dir/tag_universal once (rank 0; the others wait)."""

        out = ds_dir / f"{tag}_universal"
        if self.env.is_main and not out.is_dir():
            partial = ds_dir / f"{tag}_universal.partial"
            shutil.rmtree(partial, ignore_errors=True)
            result = subprocess.run(
                [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state",
                 "--input_folder", str(ds_dir / tag), "--output_folder", str(partial),
                 "--num_extract_workers", "1", "--num_merge_workers", "1"],
                capture_output=True, text=True,
            )
            if result.returncode != 0:
                raise UserError(f"could not convert {ds_dir / tag} to a universal checkpoint for "
                                f"{self.env.world_size} ranks: {result.stderr.strip().splitlines()[-1:]}")
            # The universal loader reads the model file under the tag it is given.
            for model_file in (ds_dir / tag).glob("mp_rank_*_model_states.pt"):
                if not (partial / model_file.name).exists():
                    shutil.copy2(model_file, partial / model_file.name)
            partial.rename(out)
        if dist.is_initialized():
            dist.barrier()
        return out.name


def _scalars_as_vectors(model: nn.Module) -> set[str]:
    """View every 0-dim parameter (CLIP's logit scale, SigLIP's bias; 0-dim as in OpenAI's and
    OpenCLIP's models) as shape [1] while DeepSpeed holds the model, and return their names.

    DeepSpeed 0.19 views parameters as bytes to broadcast them (at start-up, and in ZeRO-3's
    partitioning) and merges fragments with torch.cat in its universal-checkpoint converter, and
    all three fail on a 0-dim tensor. Shape [1] broadcasts like a scalar in the loss, so the model
    code is unchanged; checkpoints get the 0-dim shape back (`_model_state_fp32`)."""
    names = set()
    for name, param in model.named_parameters():
        if param.dim() == 0:
            param.data = param.data.reshape(1)
            names.add(name)
    return names
