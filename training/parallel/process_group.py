"""Rank bookkeeping: the process group and the device (collectives are in collectives.py).

torchrun (or SLURM via launch/) sets RANK / WORLD_SIZE / LOCAL_RANK; a plain
`python -m training.main` is a world of one with no process group at all. Model and loss code
never import this module.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("engine.device=cuda but no CUDA GPU is visible; use engine.device=cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(requested)


def setup_distributed(device: str = "auto", timeout_minutes: int = 30) -> Distributed:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        _warn_if_restarts_cannot_reconnect()
        # NCCL between GPUs; gloo for CPU runs (the tests and laptops).
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=dev if dev.type == "cuda" else None,
        )
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def _warn_if_restarts_cannot_reconnect() -> None:
    # torchrun sets these for its workers. With the agent's store shared across restart rounds
    # (torch's default), a restarted round's gloo/NCCL connect reads the dead round's addresses
    # and fails; launch/ scripts turn the sharing off.
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        log.warning(
            "torchrun --max-restarts %d with a shared rendezvous store: restarted ranks may fail "
            "to connect; export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (launch/ scripts do)", restarts
        )


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
