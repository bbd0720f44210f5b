"""Run under torchrun by test_fsdp2_engine.py, on one fixed global batch of 8 pairs, each rank
taking its rows (as tests/ddp_step_check.py does for DDP).

    fsdp2_check.py train RUN_DIR OUT    DDP takes 3 steps; FSDP2 from the same initial weights
                                        takes 3 (also with activation checkpointing, and both
                                        with 2 accumulated micro-batches), saves a sharded checkpoint in the background
                                        and takes 2 more while it is written
    fsdp2_check.py resume RUN_DIR OUT   FSDP2 from other weights loads RUN_DIR's newest sharded
                                        checkpoint (on any number of ranks), then takes 2 steps
Rank 0 saves losses and full (gathered) model and optimizer states to OUT.
"""

import os
import sys
from pathlib import Path

import torch

sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "tests")]
from test_nonfinite_steps import _batch, _small_model, rank_rows  # noqa: E402
from training import checkpoint as ckpt  # noqa: E402
from training.losses import ClipLoss  # noqa: E402
from training.optim import OptimConfig, build_optimizer  # noqa: E402
from training.parallel.engines import EngineConfig, build_engine  # noqa: E402
from training.parallel.process_group import setup_distributed  # noqa: E402
from training.train import train_step  # noqa: E402

GLOBAL_BATCH = 8
mode, run_dir, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
env = setup_distributed("cpu")
batch = rank_rows(_batch(GLOBAL_BATCH, seed=1), env)


def engine_for(name: str, seed: int, grad_checkpointing: bool = False):
    torch.manual_seed(seed)  # the same initial weights on every rank
    model = _small_model()
    model.set_grad_checkpointing(grad_checkpointing)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, fused=False))
    return build_engine(EngineConfig(name=name, precision="fp32"), model, optimizer, env,
                        grad_clip=1.0, micro_batch=GLOBAL_BATCH // env.world_size, accum_steps=1)


def steps(engine, n: int, micro_batches: int = 1) -> list[float]:
    size = len(batch["text"]) // micro_batches
    micro = [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(micro_batches)]
    return [train_step(engine, micro, ClipLoss(), env).loss for _ in range(n)]


result = {}
if mode == "train":
    ddp = engine_for("ddp", 0)
    result["ddp_losses"] = steps(ddp, 3)
    result["ddp_model"] = {k: v.clone() for k, v in ddp.module.state_dict().items()}
    result["ddp_optimizer"] = ddp.optimizer.state_dict()
    # Two accumulated micro-batches per step: gradients reduced only after the last one.
    result["ddp_accum_losses"] = steps(engine_for("ddp", 0), 3, micro_batches=2)
    result["accum_losses"] = steps(engine_for("fsdp2", 0), 3, micro_batches=2)
    # Activation checkpointing (each block recomputed in backward, its weights gathered again).
    result["recompute_losses"] = steps(engine_for("fsdp2", 0, grad_checkpointing=True), 3)
    fsdp = engine_for("fsdp2", 0)
    result["losses"] = steps(fsdp, 3)
    result["model"], result["optimizer"] = fsdp.full_state()
    extra = {"metrics": {"step": 3}, "world_size": env.world_size, "rng": [], "data": []}
    saved_at = fsdp.save(run_dir, 3, extra, keep=2)
    result["losses_after"] = steps(fsdp, 2)  # while the checkpoint is being written
    fsdp.wait_for_checkpoint()
    result["saved_at"] = str(saved_at)
else:
    fsdp = engine_for("fsdp2", 123)  # other initial weights: only the checkpoint can restore them
    path = ckpt.latest_checkpoint(run_dir, sharded=True)
    state = fsdp.load(path)
    result["loaded_step"] = state["step"]
    result["model"], result["optimizer"] = fsdp.full_state()
    result["losses_after"] = steps(fsdp, 2)
if env.is_main:
    torch.save(result, out)
