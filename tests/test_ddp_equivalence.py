"""Distributed == single process: two gloo ranks under torchrun, each holding half of a global
batch, take the same steps as one process holding all of it (the contrastive loss sees every
rank's features through the gathered all-to-all similarity; DDP averages the gradients)."""

from __future__ import annotations

import subprocess
import sys

import torch

from trainer_cli import REPO_ROOT, subprocess_env


def _steps(nproc: int, out) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         str(nproc), "tests/ddp_step_check.py", str(out)],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


def test_two_ranks_take_the_one_process_steps_on_the_same_global_batch(tmp_path):
    one, two = _steps(1, tmp_path / "one.pt"), _steps(2, tmp_path / "two.pt")
    assert one["losses"][-1] < one["losses"][0]
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]),
                               rtol=1e-5, atol=1e-6)
    # atol 1e-5 on the weights: Adam divides by sqrt(v), so on a coordinate whose gradient is
    # near zero the all-reduce's other summation order moves the update by up to ~1e-6 (seen:
    # 1.3e-6 on one of 65,536 weights, on an AVX-512 CPU). A wrong step would differ by ~lr = 1e-3.
    for name, value in one["model"].items():
        torch.testing.assert_close(two["model"][name], value, rtol=1e-5, atol=1e-5)
