"""Losses against reference formulas, and distributed (real gloo processes) == single process.

The distributed check follows what training does: each rank holds a shard of the global batch,
computes the loss with gathered features and backpropagates. It must hold that
  * mean over ranks of the losses == the single-process loss on the whole batch;
  * feature gradients, which each rank sums over all ranks' losses, divided by world size
    (DDP's averaging) == single-process gradients; same for logit scale / bias (averaged);
  * a DDP-wrapped encoder ends up with exactly the single-process parameter gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from training.parallel.collectives import gather_features_with_grad, sum_over_ranks, world_info
from training.parallel.process_group import Distributed
from training.losses import (
    LOSS_NAMES,
    ClipLoss,
    LossConfig,
    SigLipLoss,
    SoftTargetClipLoss,
    build_loss,
)

BATCH_PER_RANK = 3
DIM = 8


def _features(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    # Texts correlated with their images, so the losses are not at their chance values.
    text = image + 0.8 * torch.randn(n, DIM, generator=g, dtype=torch.float64)
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


# -- reference maths (float64, loops) -----------------------------------------------------------


def ref_clip(image, text, scale):
    n = image.shape[0]
    total = 0.0
    for i in range(n):
        row = [math.exp(scale * float(image[i] @ text[j])) for j in range(n)]
        col = [math.exp(scale * float(text[i] @ image[j])) for j in range(n)]
        total += -math.log(row[i] / sum(row)) - math.log(col[i] / sum(col))
    return total / (2 * n)


def ref_siglip(image, text, scale, bias):
    n = image.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = scale * float(image[i] @ text[j]) + bias
            total += math.log1p(math.exp(-z * logit))  # -log sigmoid(z * logit)
    return total / n


def ref_soft_clip(image, text, scale, target_scale):
    n = image.shape[0]
    total = 0.0
    for i in range(n):
        sims = [
            target_scale * (float(image[i] @ image[j]) + float(text[i] @ text[j])) / 2
            for j in range(n)
        ]
        targets = [math.exp(s) / sum(math.exp(t) for t in sims) for s in sims]
        row = [scale * float(image[i] @ text[j]) for j in range(n)]
        col = [scale * float(text[i] @ image[j]) for j in range(n)]
        for logits in (row, col):
            log_z = math.log(sum(math.exp(v) for v in logits))
            total += -sum(t * (v - log_z) for t, v in zip(targets, logits, strict=True))
    return total / (2 * n)


@pytest.mark.parametrize("scale", [1.0, 1 / 0.07, 100.0])
def test_clip_loss_matches_reference(scale):
    image, text = _features(6, seed=1)
    got = ClipLoss()(image, text, torch.tensor(scale, dtype=torch.float64))
    torch.testing.assert_close(got.item(), ref_clip(image, text, scale), rtol=1e-6, atol=1e-6)


def test_siglip_loss_matches_reference():
    image, text = _features(6, seed=2)
    got = SigLipLoss()(image, text, torch.tensor(10.0), torch.tensor(-10.0))
    torch.testing.assert_close(
        got.item(), ref_siglip(image.float(), text.float(), 10.0, -10.0), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="logit bias"):
        SigLipLoss()(image, text, torch.tensor(10.0))


@pytest.mark.parametrize("target_scale", [None, 5.0])
def test_soft_clip_loss_matches_reference(target_scale):
    image, text = _features(6, seed=3)
    scale = 1 / 0.07
    got = SoftTargetClipLoss(target_scale)(image, text, torch.tensor(scale))
    expected = ref_soft_clip(image.float(), text.float(), scale, target_scale or scale)
    torch.testing.assert_close(got.item(), expected, rtol=1e-5, atol=1e-5)


def test_soft_clip_reduces_to_clip_for_sharp_targets():
    image, text = _features(6, seed=4)
    scale = torch.tensor(10.0)
    soft = SoftTargetClipLoss(target_scale=1e4)(image, text, scale)
    torch.testing.assert_close(soft, ClipLoss()(image, text, scale).float())


def test_clip_loss_ignores_bias_but_keeps_it_in_graph():
    image, text = _features(5, seed=5)
    bias = torch.tensor(-3.0, requires_grad=True)
    with_bias = ClipLoss()(image, text, torch.tensor(7.0), bias)
    torch.testing.assert_close(with_bias, ClipLoss()(image, text, torch.tensor(7.0)).float())
    with_bias.backward()
    assert bias.grad is not None and abs(bias.grad.item()) < 1e-6


def test_losses_compute_in_fp32_under_autocast():
    image, text = _features(4, seed=6)
    image, text = image.to(torch.bfloat16), text.to(torch.bfloat16)
    for name in LOSS_NAMES:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = build_loss(LossConfig(name))(
                image, text, torch.tensor(10.0), torch.tensor(-10.0)
            )
        assert loss.dtype == torch.float32, name


def test_loss_config_validation():
    assert isinstance(build_loss(LossConfig()), ClipLoss)
    assert isinstance(
        build_loss(LossConfig("soft_clip", soft_target_scale=3.0)), SoftTargetClipLoss
    )
    with pytest.raises(ValueError):
        LossConfig("infonce")
    with pytest.raises(ValueError):
        LossConfig("clip", soft_target_scale=3.0)
    with pytest.raises(TypeError):
        LossConfig(name="clip", temperature=0.07)  # unknown keys are errors


def test_single_process_helpers_are_identity():
    assert world_info() == (0, 1)
    x = torch.randn(3, 4)
    assert gather_features_with_grad(x) is x
    single = Distributed(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    torch.testing.assert_close(sum_over_ranks(x.clone(), single), x)


# -- distributed == single process --------------------------------------------------------------


class _PairEncoder(nn.Module):
    """Stand-in for CLIP: two linear towers, normalised, plus temperature and bias."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(5, DIM)
        self.text = nn.Linear(5, DIM)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0))

    def forward(self, x, y):
        return (
            F.normalize(self.image(x), dim=-1),
            F.normalize(self.text(y), dim=-1),
            self.logit_scale.exp(),
            self.logit_bias,
        )


def _inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, 5, generator=g)
    return x, x + 0.5 * torch.randn(n, 5, generator=g)


def _run_step(name: str, image, text) -> dict[str, torch.Tensor]:
    """Loss and gradients w.r.t. (this process's) features, logit scale and bias, in fp32 like
    the losses themselves (float64 would only be rounded to fp32 inside)."""
    image, text = image.float().requires_grad_(), text.float().requires_grad_()
    log_scale, bias = torch.tensor(2.0, requires_grad=True), torch.tensor(-1.5, requires_grad=True)
    loss = build_loss(LossConfig(name))(
        F.normalize(image, dim=-1), F.normalize(text, dim=-1), log_scale.exp(), bias
    )
    loss.backward()
    return {
        "loss": loss.detach(),
        "image": image.grad,
        "text": text.grad,
        "scale": log_scale.grad,
        "bias": bias.grad,
    }


def _run_encoder_step(name: str, model: nn.Module, x, y) -> dict[str, torch.Tensor]:
    image, text, scale, bias = model(x, y)
    build_loss(LossConfig(name))(image, text, scale, bias).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        assert world_info() == (rank, world)
        shard = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
        image, text = _features(world * BATCH_PER_RANK, seed=11)
        x, y = _inputs(world * BATCH_PER_RANK)
        results = {}
        for name in LOSS_NAMES:
            results[name] = _run_step(name, image[shard], text[shard])
            # What the trainer logs: the sum of the ranks' losses over the world size.
            env = Distributed(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
            results[name]["logged"] = sum_over_ranks(results[name]["loss"].clone(), env) / world
            ddp = nn.parallel.DistributedDataParallel(_PairEncoder())
            results[name]["ddp"] = {
                n.removeprefix("module."): g
                for n, g in _run_encoder_step(name, ddp, x[shard], y[shard]).items()
            }
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_distributed_losses_equal_single_process(world, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    image, text = _features(world * BATCH_PER_RANK, seed=11)
    x, y = _inputs(world * BATCH_PER_RANK)
    for name in LOSS_NAMES:
        single = _run_step(name, image, text)
        per_rank = [r[name] for r in ranks]
        # values: the mean of the per-rank losses is the global loss, and is what every rank logs
        torch.testing.assert_close(
            torch.stack([r["loss"] for r in per_rank]).mean(), single["loss"]
        )
        for r in per_rank:
            torch.testing.assert_close(r["logged"], single["loss"])
        # feature gradients: rank r holds the sum over ranks' losses; DDP divides by world
        for key in ("image", "text"):
            gathered = torch.cat([r[key] for r in per_rank]) / world
            torch.testing.assert_close(
                gathered, single[key], msg=lambda m, n=name, k=key: f"{n} {k} grad: {m}"
            )
        for key in ("scale", "bias"):
            mean = torch.stack([r[key] for r in per_rank]).mean()
            torch.testing.assert_close(
                mean, single[key], msg=lambda m, n=name, k=key: f"{n} {k} grad: {m}"
            )
        # end to end through DDP: every rank ends with the single-process parameter gradients
        expected = _run_encoder_step(name, _PairEncoder(), x, y)
        for r in per_rank:
            for param, grad in expected.items():
                torch.testing.assert_close(
                    r["ddp"][param], grad, msg=lambda m, n=name, k=param: f"{n} {k} (DDP): {m}"
                )
