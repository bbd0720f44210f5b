"""The one place that decides how the model is run: plain/DDP with torch autocast, DeepSpeed, or
FSDP2.

The training loop talks to an engine through six calls (zero_grad, accumulate, forward,
backward, finish_step, and checkpoint save/load); the model and the loss never know which engine
runs them.

Engines live in ddp_engine.py, deepspeed_engine.py and fsdp2_engine.py; this module holds their
shared config.

- `ddp`: one process, or DistributedDataParallel under torchrun/SLURM. Precision comes from
  training.parallel.precision (autocast + a GradScaler for fp16). Checkpoints are our single-file format.
- `deepspeed`: DeepSpeed's engine with ZeRO stage 0-3, bf16 or fp16 weights, its own gradient
  accumulation and clipping, and its own (sharded) checkpoints under RUN_DIR/deepspeed/. Beside
  each, rank 0 writes a model-only file in our format to RUN_DIR/checkpoints/, so eval jobs and
  `checkpoint.resume=latest` find every run's checkpoints the same way.
- `fsdp2`: torch's fully_shard per transformer block and on the root, bf16/fp32 through its
  mixed-precision policy, and sharded checkpoints written in the background with
  torch.distributed.checkpoint (RUN_DIR/checkpoints/step_N.dcp/), which resume on any world size
  and convert to the single-file format (`python -m training.convert_checkpoint`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from data_pipeline.errors import UserError

from training.parallel.ddp_engine import DDPEngine
from training.parallel.deepspeed_engine import DeepSpeedEngine, deepspeed_config
from training.parallel.fsdp2_engine import FSDP2Engine
from training.parallel.precision import Precision, PrecisionName
from training.parallel.process_group import Distributed


@dataclass
class EngineConfig:
    """How the model is run: the `[engine]` section of a run."""

    name: Literal["ddp", "deepspeed", "fsdp2"] = "ddp"
    precision: PrecisionName = "auto"  # chosen from the hardware: see parallel/precision.py
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    # "fused": scaled_dot_product_attention's flash/memory-efficient kernels; "math": plain
    # matmul + softmax. "auto": fused on GPUs, math on CPUs, where the fused kernel measured
    # ~25% slower per ViT-S/32 step at CLIP's 50 image / ~14 text tokens (bench/profiles).
    attention: Literal["auto", "fused", "math"] = "auto"
    # DeepSpeed JSON config (ZeRO stage, bf16/fp16, ...). Empty: built from zero_stage and
    # precision. Batch size, accumulation and clipping always come from our own config.
    deepspeed_config: str = ""
    zero_stage: int = 1
    # How 4-D weights and activations are laid out. channels_last (NHWC) is what cuDNN's
    # tensor-core convolutions read, NVIDIA's advice for convnets under AMP (not measured here:
    # no GPU). On 2 CPU cores it did not pay: the demo's ResNet-10-T forward+backward alone ran
    # 451 -> 338 ms per batch of 128 in fp32, but 80 trainer steps took 66 s either way.
    memory_format: Literal["contiguous", "channels_last"] = "contiguous"

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"engine.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.deepspeed_config and self.name != "deepspeed":
            raise ValueError("engine.deepspeed_config is only used with engine.name=deepspeed")
        if self.compile and self.name == "deepspeed":
            raise ValueError("engine.compile is not supported with engine.name=deepspeed; use ddp")
        if self.memory_format == "channels_last" and self.name != "ddp":
            # ZeRO flattens parameters into contiguous buffers, which would undo the layout.
            raise ValueError("engine.memory_format=channels_last is only supported with "
                             "engine.name=ddp")


def uses_channels_last(cfg: EngineConfig) -> bool:
    """Whether build_engine lays `model` out channels_last (only the ddp engine does)."""
    return cfg.name == "ddp" and cfg.memory_format == "channels_last"


def build_engine(
    cfg: EngineConfig, model: nn.Module, optimizer: torch.optim.Optimizer, env: Distributed,
    *, grad_clip: float, micro_batch: int, accum_steps: int,
):
    """Wrap `model` for this run: attention kernel, device, DDP or DeepSpeed, compile.
    `cfg.precision` must be resolved already (`choose_precision`)."""
    if uses_channels_last(cfg):
        # In place: parameters keep their identity, so the optimizer built on them still holds
        # them. Inputs need no conversion: a conv with NHWC weights runs NHWC.
        model.to(memory_format=torch.channels_last)
    model.set_fused_attention(
        cfg.attention == "fused" or (cfg.attention == "auto" and env.device.type == "cuda")
    )
    if cfg.name == "ddp":
        precision = Precision(cfg.precision, env.device.type)
        return DDPEngine(model, optimizer, precision, env, grad_clip, cfg.compile)
    if cfg.name == "fsdp2":
        return FSDP2Engine(model, optimizer, cfg.precision, env, grad_clip, cfg.compile)
    if cfg.precision == "fp16" and env.device.type == "cpu":
        raise UserError(
            "engine.precision=fp16: DeepSpeed's CPU accelerator has no fp16; use "
            "engine.precision=fp32 or bf16, or engine.name=ddp (fp16 with a GradScaler runs on CPU)"
        )
    ds_config = deepspeed_config(
        cfg.deepspeed_config, cfg.zero_stage, cfg.precision,
        micro_batch=micro_batch, accum_steps=accum_steps, grad_clip=grad_clip,
    )
    return DeepSpeedEngine(model.to(env.device), optimizer, env, ds_config)
