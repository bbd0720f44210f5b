"""Tiled (ring, memory-linear) losses == the naive gathered losses, values AND gradients.

The naive losses are themselves checked against loop-by-loop reference maths and against the
single-process loss in test_losses.py; here the tiled ones must reproduce them:
  * in one process, at fp32 tolerances for fp32 features and bf16 tolerances for bf16 ones, with
    tile sizes that do not divide the batch (so ragged last tiles and diagonals that cross tile
    borders are exercised), and against float64 finite differences (gradcheck);
  * per rank, in real gloo groups of 1 (in the test process), 2 and 4 processes: each rank's
    tiled loss and its gradients w.r.t. its features (summed over all ranks' losses by the
    ring), logit scale and bias equal the naive loss's on the same rank, with every rank
    weighting its loss differently;
  * without saving anything quadratic in the batch for backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from training.config_loading import ConfigError, from_dict, load_tree
from training.losses import ClipLoss, LossConfig, SigLipLoss, build_loss
from training.losses.tiled_clip import TiledClipLoss, _RingClipCrossEntropy
from training.losses.tiled_siglip import TiledSigLipLoss, _RingSigmoidLoss

BATCH_PER_RANK = 5
DIM = 8
NAIVE = {"clip": ClipLoss, "siglip": SigLipLoss}
TILED = {"clip": TiledClipLoss, "siglip": TiledSigLipLoss}


def _features(n: int, seed: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    # texts correlated with their images, so the losses are away from their chance values
    text = image + 0.8 * torch.randn(n, DIM, generator=g, dtype=torch.float64)
    return F.normalize(image, dim=-1).to(dtype), F.normalize(text, dim=-1).to(dtype)


def _step(loss_fn, image, text, scale=10.0, bias=-5.0, weight=1.0) -> dict[str, torch.Tensor]:
    """Loss and gradients of weight * loss w.r.t. features (in their own dtype), logit scale
    and bias."""
    image = image.detach().clone().requires_grad_()
    text = text.detach().clone().requires_grad_()
    scale = torch.tensor(scale, requires_grad=True)
    bias = torch.tensor(bias, requires_grad=True)
    loss = loss_fn(image, text, scale, bias)
    (weight * loss).backward()
    return {
        "loss": loss.detach(),
        "image": image.grad,
        "text": text.grad,
        "scale": scale.grad,
        "bias": bias.grad,
    }


def _assert_same(got: dict, expected: dict, what: str) -> None:
    # assert_close picks its tolerances from the dtype: fp32 (1.3e-6 rel) for the loss and the
    # scale/bias gradients, bf16 (1.6e-2 rel) for gradients of bf16 features.
    for key, value in expected.items():
        torch.testing.assert_close(
            got[key], value, msg=lambda m, k=key: f"{what}, {k}: {m}"
        )


# -- one process ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["clip", "siglip"])
@pytest.mark.parametrize("tile", [1, 3, 4, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_equals_naive_single_process(name, tile, dtype):
    image, text = _features(7, seed=1, dtype=dtype)
    expected = _step(NAIVE[name](), image, text)
    got = _step(TILED[name](tile_size=tile), image, text)
    assert got["loss"].dtype == torch.float32 and got["image"].dtype == dtype
    _assert_same(got, expected, f"{name} tile={tile} {dtype}")


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_tiled_is_stable_for_confident_logits(name):
    # A large scale and near-duplicate features make some logits ~100 apart: exp() overflows
    # without the log-sum-exp shift, and 1 - sigmoid cancels without computing sigmoid(-x).
    image, text = _features(6, seed=2)
    text = F.normalize(image + 1e-3 * text, dim=-1)
    expected = _step(NAIVE[name](), image, text, scale=100.0, bias=-10.0)
    got = _step(TILED[name](tile_size=4), image, text, scale=100.0, bias=-10.0)
    assert all(torch.isfinite(v).all() for v in got.values())
    _assert_same(got, expected, name)


def test_tiled_functions_pass_gradcheck():
    # Finite differences in float64 (tiles are computed in float64 too): the hand-written
    # backward is checked against the forward itself, not just against another implementation.
    image, text = _features(5, seed=3, dtype=torch.float64)
    image.requires_grad_()
    text.requires_grad_()
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda i, t, s: _RingClipCrossEntropy.apply(i, t, s, 2), (image, text, scale)
    )
    assert torch.autograd.gradcheck(
        lambda i, t, s, b: _RingSigmoidLoss.apply(i, t, s, b, 3), (image, text, scale, bias)
    )


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_tiled_computes_in_fp32_under_autocast(name):
    image, text = _features(6, seed=4, dtype=torch.bfloat16)
    scale, bias = torch.tensor(10.0), torch.tensor(-5.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = TILED[name](tile_size=4)(image, text, scale, bias)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, NAIVE[name]()(image, text, scale, bias))


def test_tiled_saves_nothing_quadratic_for_backward():
    # What autograd keeps between forward and backward: the naive loss keeps (B, B) logits,
    # the tiled one only features and per-row statistics.
    n, tile = 64, 16
    image, text = _features(n, seed=5)
    image.requires_grad_()
    text.requires_grad_()
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-5.0, requires_grad=True)

    def saved_elements(loss_fn) -> int:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel()) or t, lambda t: t
        ):
            loss_fn(image, text, scale, bias)
        return sum(saved)

    for name in ("clip", "siglip"):
        assert saved_elements(NAIVE[name]()) >= n * n
        assert saved_elements(TILED[name](tile_size=tile)) <= 6 * n * DIM + 4 * n


def test_siglip_still_needs_a_bias():
    image, text = _features(4, seed=6)
    with pytest.raises(ValueError, match="logit bias"):
        TiledSigLipLoss()(image, text, torch.tensor(10.0))


def test_loss_config_selects_tiled_losses():
    assert isinstance(build_loss(LossConfig()), ClipLoss)  # naive stays the default
    clip = build_loss(LossConfig("clip", tiled=True, tile_size=256))
    assert isinstance(clip, TiledClipLoss) and clip.tile_size == 256
    assert isinstance(build_loss(LossConfig("siglip", tiled=True)), TiledSigLipLoss)
    # the command-line form from the issue
    tree = load_tree(None, ["loss.tiled=true", "loss.tile_size=1024"])
    cfg = from_dict(LossConfig, tree["loss"], "loss")
    assert cfg.tiled is True and cfg.tile_size == 1024
    with pytest.raises(ValueError, match="soft_clip"):
        LossConfig("soft_clip", tiled=True)
    with pytest.raises(ValueError, match="tile_size"):
        LossConfig("clip", tiled=True, tile_size=0)
    with pytest.raises(ConfigError):
        from_dict(LossConfig, {"tiled": "maybe"}, "loss")


# -- real gloo process groups ---------------------------------------------------------------------


def _compare_on_rank(rank: int, world: int) -> dict:
    """Every (loss, dtype, tile) case on this rank's shard: naive and tiled results."""
    shard = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
    # Ranks weight their losses differently, so a rank that applied its own upstream gradient
    # to the gradients it relays for other ranks' features would be caught.
    weight = 1.0 + rank
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        image, text = _features(world * BATCH_PER_RANK, seed=11, dtype=dtype)
        for name in ("clip", "siglip"):
            naive = _step(NAIVE[name](), image[shard], text[shard], weight=weight)
            for tile in (2, 3):  # neither divides the local (5) or global batch
                tiled = _step(
                    TILED[name](tile_size=tile), image[shard], text[shard], weight=weight
                )
                results[(name, str(dtype), tile)] = (naive, tiled)
    return results


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # world processes share the test machine's cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(_compare_on_rank(rank, world), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _check(per_rank: list[dict], world: int) -> None:
    for case in per_rank[0]:
        for rank, results in enumerate(per_rank):
            naive, tiled = results[case]
            _assert_same(tiled, naive, f"world={world} rank={rank} {case}")
        # and, as for the naive loss, the mean over ranks is the single-process loss
        name, dtype, _ = case
        image, text = _features(world * BATCH_PER_RANK, seed=11, dtype=getattr(torch, dtype[6:]))
        single = _step(NAIVE[name](), image, text)["loss"]
        mean = torch.stack([results[case][1]["loss"] for results in per_rank]).mean()
        torch.testing.assert_close(mean, single, msg=lambda m, c=case: f"{c} mean: {m}")


def test_tiled_equals_naive_on_one_gloo_rank(tmp_path):
    # A one-process gloo group needs no second process: run it here and save a spawn.
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1
    )
    try:
        results = _compare_on_rank(0, 1)
    finally:
        dist.destroy_process_group()
    _check([results], 1)


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_tiled_equals_naive_on_gloo_ranks(world, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    _check([torch.load(tmp_path / f"rank{r}.pt") for r in range(world)], world)
