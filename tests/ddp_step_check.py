"""Run under torchrun by test_ddp_equivalence.py: three DDP train steps on one fixed global batch
of 8 pairs, each rank taking its rows; rank 0 saves the losses and final weights to argv[1]."""

import os
import sys

import torch

sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "tests")]
from test_nonfinite_steps import _batch, _small_model, rank_rows  # noqa: E402
from training.losses import ClipLoss  # noqa: E402
from training.optim import OptimConfig, build_optimizer  # noqa: E402
from training.parallel.engines import EngineConfig, build_engine  # noqa: E402
from training.parallel.process_group import setup_distributed  # noqa: E402
from training.train import train_step  # noqa: E402

GLOBAL_BATCH = 8
env = setup_distributed("cpu")
torch.manual_seed(0)  # the same initial weights on every rank, as DDP also broadcasts
model = _small_model()
engine = build_engine(EngineConfig(precision="fp32"), model,
                      build_optimizer(model, OptimConfig(lr=1e-3, fused=False)), env,
                      grad_clip=1.0, micro_batch=GLOBAL_BATCH // env.world_size, accum_steps=1)
batch = rank_rows(_batch(GLOBAL_BATCH, seed=1), env)
losses = [train_step(engine, [batch], ClipLoss(), env).loss for _ in range(3)]
if env.is_main:
    torch.save({"losses": losses, "model": engine.module.state_dict()}, sys.argv[1])
