"""The `fsdp2` engine: PyTorch's own sharding (`torch.distributed.fsdp.fully_shard`, FSDP2 over
DTensor) and sharded, asynchronous checkpoints (training/parallel/dcp_checkpoint.py).

Each transformer block of both towers is its own FSDP unit (its parameters are all-gathered just
before its forward and backward and freed after), the rest of the model is the root unit. The
optimizer keeps only this rank's shard of every parameter and of its AdamW moments. Precision is
FSDP2's mixed-precision policy: bf16 compute copies of the fp32 weights, gradients reduced in fp32.
The gathered contrastive loss and the loop are the same as under DDP.

Activation checkpointing is the model's own switch (model.grad_checkpointing), which wraps each
block in torch.utils.checkpoint; FSDP2 re-gathers a block's weights for its recomputation.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from data_pipeline.errors import UserError
from training import checkpoint as ckpt
from training.parallel import dcp_checkpoint
from training.parallel.deepspeed_engine import _scalars_as_vectors
from training.parallel.process_group import Distributed


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The per-block FSDP units: timm's `blocks` (ViTs) or `stages` (ConvNeXt-like trunks) in the
    image tower, our text tower's blocks. A trunk with neither stays in the root unit."""
    trunk = model.visual.trunk
    image = getattr(trunk, "blocks", None) or getattr(trunk, "stages", None) or []
    return [*image, *model.text.blocks]


class FSDP2Engine:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, precision: str,
                 env: Distributed, grad_clip: float, compile_model: bool):
        if precision == "fp16":
            raise UserError("engine.name=fsdp2 runs fp32 or bf16 (fp16 would need a sharded "
                            "gradient scaler); use engine.precision=bf16 or fp32, or engine.name=ddp")
        backend = "nccl" if env.device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            # One process without torchrun: FSDP2 and DCP work on a device mesh, so a world of
            # one gets a process group too (no rendezvous needed for one rank).
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        self.env = env
        self.grad_clip = grad_clip
        # FSDP2 shards every parameter along dim 0 and refuses 0-dim ones (CLIP's logit scale):
        # viewed as shape [1] while sharded, as under DeepSpeed; checkpoints record their names.
        self.scalar_params = sorted(_scalars_as_vectors(model))
        model.to(env.device)
        # fully_shard replaces each parameter by a DTensor parameter, so the optimizer (built on
        # the plain ones) is pointed at the new ones by name, keeping its groups and order.
        name_of = {id(p): n for n, p in model.named_parameters()}
        group_names = [[name_of[id(p)] for p in g["params"]] for g in optimizer.param_groups]
        if optimizer.state:
            raise ValueError("the fsdp2 engine needs an optimizer that has not stepped yet")
        if env.enabled:
            # Ranks build their models from per-rank seeds; DDP starts everyone from rank 0's
            # weights by broadcasting them, and so does this engine, before each rank keeps only
            # its shard (all ranks, each tensor in and out whole).
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor.data, src=0)
        mesh = init_device_mesh(env.device.type, (env.world_size,))
        dtype = torch.bfloat16 if precision == "bf16" else None
        # Blocks hand bf16 activations on (the next unit computes in bf16 too); the model's
        # outputs are fp32, so the loss (similarities over the global batch) is computed in fp32,
        # as autocast leaves it under the ddp engine.
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        root_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32,
                                           output_dtype=torch.float32)
        for block in transformer_blocks(model):
            if compile_model:
                block.compile()  # per block, before sharding (FSDP2's hooks stay outside the graph)
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=root_policy)
        params = dict(model.named_parameters())
        for group, names in zip(optimizer.param_groups, group_names):
            group["params"] = [params[n] for n in names]
        self.module: nn.Module = model
        self.wrapped = model
        self.optimizer = optimizer
        # DCP's background writer talks between ranks (gathering plans and write results) while
        # the loop's collectives run: on the same group the two streams would interleave and
        # mismatch (seen: gloo "received data size doesn't match"), so it gets a gloo group of its
        # own, which also gives GPU runs the CPU backend DCP's async save requires.
        self.checkpoint_group = dist.new_group(backend="gloo")
        self.pending: dcp_checkpoint.PendingSave | None = None

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def accumulate(self, last: bool):
        # Accumulating micro-batches: gradients are reduce-scattered only after the last one.
        assert isinstance(self.module, FSDPModule)
        self.module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.module(image, text)  # FSDP2 casts floating inputs to the compute dtype

    def backward(self, loss: torch.Tensor, n_micro: int, last: bool) -> None:
        (loss / n_micro).backward()

    def finish_step(self, skip: bool) -> float:
        """Clip and apply the accumulated gradients, or drop them when `skip`."""
        if skip:
            self.zero_grad()
            return float("nan")
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        # Each rank holds a shard of every gradient: the norm of the shards' norms is a partial
        # DTensor, and full_tensor() all-reduces it (all ranks, a scalar) into the global norm.
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm)
        self.optimizer.step()
        return float(norm)

    def logit_scale(self) -> torch.Tensor:
        """The full logit scale (a collective: every rank calls it, for the log)."""
        return self.module.logit_scale.full_tensor().reshape(())

    def full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Model and optimizer state as full tensors keyed by name, on every rank (collective).
        For tests and small models: a large model's full state may not fit one rank."""
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        # Copies: on one rank full_tensor() is the live parameter itself, which training changes.
        full = lambda v: (v.full_tensor() if isinstance(v, DTensor) else v).clone()  # noqa: E731
        model_state = {k: full(v) for k, v in model_state.items()}
        optim_state = {**optim_state, "state": {
            name: {k: full(v) for k, v in s.items()} for name, s in optim_state["state"].items()}}
        return model_state, optim_state

    def save(self, run_dir: Path, step: int, extra: dict[str, Any], keep: int) -> Path | None:
        """Start writing a sharded checkpoint and return at once (the loop trains on while it is
        written); its folder appears under its real name only when complete. One save at a time:
        a save waits for the one before it."""
        self.wait_for_checkpoint()
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        run_state = {"engine": "fsdp2", "scaler": {}, "scalar_params": self.scalar_params, **extra}
        self.pending = dcp_checkpoint.start_save(
            model_state, optim_state, run_state, Path(run_dir), step, keep, self.env.is_main,
            self.checkpoint_group,
        )
        return self.pending.final if self.env.is_main else None

    def wait_for_checkpoint(self) -> Path | None:
        """Block until the save in flight (if any) is complete and in place."""
        pending, self.pending = self.pending, None
        return pending.wait() if pending is not None else None

    def load(self, path: Path) -> dict[str, Any]:
        if not path.is_dir():
            raise UserError(
                f"{path} is a single-file checkpoint; engine.name=fsdp2 resumes from sharded ones: "
                f"python -m training.convert_checkpoint {path} (writes {path.with_suffix(ckpt.SHARDED_SUFFIX)})"
            )
        state = ckpt.read_run_state(path)
        if state.get("engine") != "fsdp2":
            raise UserError(f"{path} was written by the {state.get('engine')} engine; resume with "
                            f"engine.name={state.get('engine')}")
        # The optimizer's moments must exist to be loaded into: get_state_dict creates them
        # (a zero-gradient step at lr 0), shaped as this world size's shards.
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        dcp_checkpoint.load_into(model_state, optim_state, path, self.checkpoint_group)
        set_state_dict(self.module, self.optimizer, model_state_dict=model_state,
                       optim_state_dict=optim_state)
        return state
