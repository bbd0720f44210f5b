"""Config loading, checkpoints, the LR schedule and optimizer groups: the trainer's own parts."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from training import checkpoint as ckpt
from training.config_loading import ConfigError, from_dict, load_tree
from training.optim import OptimConfig, build_optimizer, lr_at


@dataclass
class Inner:
    size: int = 3
    scale: tuple[float, float] = (0.9, 1.0)
    path: str | None = None


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    flag: bool = False


def test_overrides_are_typed_and_nested(tmp_path):
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text('name = "from_file"\n[inner]\nsize = 5\n')
    tree = load_tree(cfg_file, ["inner.scale=[0.5, 1.0]", "flag=true", "inner.path=/x/y", "inner.size=7"])
    cfg = from_dict(Outer, tree)
    assert cfg == Outer(name="from_file", inner=Inner(size=7, scale=(0.5, 1.0), path="/x/y"), flag=True)


def test_unknown_key_is_an_error_naming_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key inner\.sise.*size"):
        from_dict(Outer, load_tree(None, ["inner.sise=4"]))


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="inner.size: expected an integer"):
        from_dict(Outer, load_tree(None, ["inner.size=abc"]))
    with pytest.raises(ConfigError, match="inner.size: expected an integer"):
        from_dict(Outer, load_tree(None, ["inner.size=2.5"]))


def test_missing_config_file_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_tree(tmp_path / "nope.toml", [])


def test_lr_schedule_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 110, cfg) == pytest.approx(0.1)
    assert lr_at(9, 110, cfg) == pytest.approx(1.0)
    assert lr_at(10, 110, cfg) == pytest.approx(1.0)
    assert lr_at(60, 110, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(110, 110, cfg) == pytest.approx(0.1)
    values = [lr_at(s, 110, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_no_weight_decay_on_biases_norms_embeddings_and_scale():
    from training.model import MODEL_CONFIGS, build_model

    model = build_model(MODEL_CONFIGS["tiny"]())
    model.visual.requires_grad_(False)  # a locked tower takes no optimizer state
    opt = build_optimizer(model, OptimConfig(weight_decay=0.2))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    exempt = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed and all(n.endswith("weight") for n in decayed)
    assert not any("norm" in n or "ln" in n.split(".")[-2] for n in decayed if "." in n)
    assert "logit_scale" in exempt
    assert any("token_embedding" in n for n in exempt) and any("positional" in n for n in exempt)
    assert not any(n.startswith("visual.") for n in decayed | exempt)


def test_checkpoint_round_trip_is_weights_only_and_keeps_last_k(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    rng = ckpt.capture_rng()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    for step in (10, 20, 30, 40):
        ckpt.save_checkpoint(tmp_path, step, {"model": {"w": torch.ones(2) * step}, "rng": [rng]}, keep=2)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step_00000030.pt", "step_00000040.pt"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp_")]
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))  # weights_only=True inside
    assert state["step"] == 40 and torch.equal(state["model"]["w"], torch.full((2,), 40.0))
    ckpt.restore_rng(state["rng"][0])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_failed_checkpoint_write_leaves_no_partial_file(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, {"x": torch.zeros(1)}, keep=3)

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", explode)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, {"x": torch.zeros(1)}, keep=3)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001.pt"]


def test_sample_log_drops_the_steps_a_crash_lost_and_a_cut_line(tmp_path):
    from training.sample_log import SampleLog, read_sample_log

    log = SampleLog(tmp_path, 0, resumed_step=0)
    log.record(1, ["s#1", "s#2"])
    log.record(2, ["s#3"])
    log.flush()
    with (tmp_path / "sample_keys" / "rank_00000.tsv").open("a") as f:
        f.write("3\ts#4\n1")  # step 3 was logged but its checkpoint never written; then a cut line
    resumed = SampleLog(tmp_path, 0, resumed_step=2)
    resumed.record(3, ["t#1"])
    resumed.flush()
    assert read_sample_log(tmp_path) == {0: [(1, "s#1"), (1, "s#2"), (2, "s#3"), (3, "t#1")]}
