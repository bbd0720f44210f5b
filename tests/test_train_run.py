"""The trainer end to end, as users run it: real shards from the demo pipeline, the real CLI,
torchrun for several processes."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import pytest
import torch

from training import checkpoint as ckpt
from training.model.trained import load_trained_model

from trainer_cli import torchrun, writable_corpus, losses as _losses, run as _run, train_args as _train_args


@pytest.fixture(scope="module")
def corpus(demo_shards, tmp_path_factory) -> Path:
    return writable_corpus(demo_shards, tmp_path_factory)


def test_short_run_lowers_the_loss_clearly(corpus, tmp_path):
    run_dir = tmp_path / "run"
    result = _run("training.main", *_train_args(
        corpus, run_dir, "train.steps=60", "optim.lr=2e-3", "optim.warmup_steps=10", "data.batch_size=32",
        "zeroshot.every=30", f"zeroshot.demo={corpus}",
    ))
    assert result.returncode == 0, result.stderr[-3000:]
    losses = _losses(run_dir)
    assert len(losses) == 60
    # The demo shards' sample order follows img2dataset's download threads, so each session
    # trains on a different order. Batch 32: with the demo's mostly short captions ("two red
    # circles") a batch of 16 is matched by colour alone, which 60 steps at 32 px barely start.
    # The bars still fail for a model that does not learn (chance is ln 32 = 3.47).
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < 0.8 * first and last < math.log(32) - 0.4, losses
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    zeroshot = [r for r in records if "zeroshot/demo_heldout/acc1" in r]
    assert [r["step"] for r in zeroshot] == [30, 60]
    # Loader telemetry in every step's record: the worker's rate and where its time went.
    steps = [r for r in records if "loss" in r]
    assert all(r["data_worker_samples_per_s"] > 0 for r in steps)
    shares = [sum(r[f"data_{s}_frac"] for s in ("read", "decode", "augment", "tokenize"))
              for r in steps]
    assert all(0 < share <= 1.0 for share in shares), shares
    assert all(r["data_decode_frac"] > 0 and r["data_augment_frac"] > 0 for r in steps)
    assert all(r["data_queue_depth"] >= 0 for r in steps)
    assert (run_dir / "finished.json").is_file()
    trained = load_trained_model(ckpt.latest_checkpoint(run_dir))
    assert trained.step == 60 and trained.image_size == 32


def test_resumed_run_repeats_the_uninterrupted_loss_sequence(corpus, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("train.steps=8", "data.workers=2", "data.hflip=0.5")
    result = _run("training.main", *_train_args(corpus, straight, *common))
    assert result.returncode == 0, result.stderr[-3000:]
    result = _run("training.main", *_train_args(corpus, split, *common, "train.stop_at_step=3"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (split / "finished.json").exists()
    assert [p.name for p in ckpt.list_checkpoints(split)] == ["step_00000003.pt"]
    result = _run("training.main", *_train_args(corpus, split, *common, "checkpoint.resume=latest"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    expected, resumed = _losses(straight), _losses(split)
    assert len(expected) == len(resumed) == 8
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(expected), rtol=0, atol=1e-6)
    final_a = ckpt.load_checkpoint(ckpt.latest_checkpoint(straight))["model"]
    final_b = ckpt.load_checkpoint(ckpt.latest_checkpoint(split))["model"]
    for name in final_a:
        torch.testing.assert_close(final_b[name], final_a[name], rtol=0, atol=0)


@pytest.mark.slow
def test_two_rank_resume_repeats_the_uninterrupted_losses(corpus, tmp_path):
    """Multi-rank exact resume: each rank's data stream, RNG and the shared model state."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("train.steps=6", "data.hflip=0.5", "model.name=tiny")
    result = torchrun(2, *_train_args(corpus, straight, *common))
    assert result.returncode == 0, result.stderr[-3000:]
    result = torchrun(2, *_train_args(corpus, split, *common, "train.stop_at_step=3"))
    assert result.returncode == 0, result.stderr[-3000:]
    result = torchrun(2, *_train_args(corpus, split, *common, "checkpoint.resume=latest"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "data:" not in result.stdout  # same layout
    expected, resumed = _losses(straight), _losses(split)
    assert len(expected) == len(resumed) == 6
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(expected), rtol=0, atol=1e-6)


def test_torchrun_two_processes_train_the_same_code(corpus, tmp_path):
    run_dir = tmp_path / "ddp"
    result = torchrun(2, *_train_args(corpus, run_dir, "train.steps=4"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 rank(s)" in result.stdout
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and len(state["data"]) == 2
    assert state["metrics"]["samples_seen"] == 4 * 16 * 2
    losses = _losses(run_dir)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)


def test_existing_run_is_never_overwritten(corpus, tmp_path):
    run_dir = tmp_path / "run"
    assert _run("training.main", *_train_args(corpus, run_dir, "train.steps=1")).returncode == 0
    before = ckpt.latest_checkpoint(run_dir).read_bytes()
    result = _run("training.main", *_train_args(corpus, run_dir, "train.steps=1"))
    assert result.returncode == 2
    assert "checkpoint.resume=latest" in result.stderr and "Traceback" not in result.stderr
    assert ckpt.latest_checkpoint(run_dir).read_bytes() == before


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "unknown config key train.stepz"),
        ("data.batch_size=lots", "data.batch_size: expected an integer"),
        ("model.name=giant", "unknown model 'giant'"),
        ("data.augment_on=gpu", "augment_on must be one of workers, device"),
        ("data.augment_on=device", "no GPU): use data.augment_on=workers"),
    ],
)
def test_config_mistakes_are_one_line(corpus, tmp_path, override, message):
    result = _run("training.main", *_train_args(corpus, tmp_path / "run", override))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_shard_without_usable_samples_stops_with_its_name(corpus, tmp_path):
    # OpenCLIP hangs on a shard that has .cls labels but no captions; we stop and name it.
    shards = tmp_path / "bad"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for i in range(4):
            src = next((corpus / "train").glob("*.tar"))
            with tarfile.open(src) as good:
                jpg = next(m for m in good.getmembers() if m.name.endswith(".jpg"))
                data = good.extractfile(jpg).read()
            for suffix, payload in ((".jpg", data), (".cls", b"3")):
                info = tarfile.TarInfo(f"{i:05d}{suffix}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    args = _train_args(corpus, tmp_path / "run", "train.steps=2", "data.num_samples=4")
    args = [a if not a.startswith("data.train_shards=") else f"data.train_shards={shards}" for a in args]
    args.append(f"tokenizer={corpus / 'tokenizer.json'}")
    result = _run("training.main", *args, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "00000.tar" in result.stderr and "Traceback" not in result.stderr


def test_precision_is_chosen_from_the_hardware_and_recorded(corpus, tmp_path):
    """One real run with the default precision (auto): the header says what was chosen and why,
    and the checkpoint records it (tests/test_precision.py covers the choice logic)."""
    from training.parallel.precision import choose_precision

    run_dir = tmp_path / "run"
    result = _run("training.main", *_train_args(corpus, run_dir, "train.steps=2"))
    assert result.returncode == 0, result.stderr
    expected = choose_precision("auto", "cpu")
    assert f"precision {expected.name} ({expected.reason})" in result.stdout
    state = torch.load(ckpt.latest_checkpoint(run_dir), weights_only=True)
    assert state["config"]["precision_choice"] == {
        "requested": "auto", "name": expected.name, "reason": expected.reason, "warning": None}
    assert state["config"]["engine"]["precision"] == expected.name


def test_architectures_from_tables_and_openclip_json_train_and_reload(corpus, tmp_path):
    """No Python needed for a new architecture: [model.vision]/[model.text] tables, or an
    OpenCLIP model-config JSON as it is; eval rebuilds either from the checkpoint alone."""
    tables = ("model.name=tiny", "model.embed_dim=64", "model.vision.width=64",
              "model.vision.layers=2", "model.vision.heads=2", "model.vision.patch_size=8",
              "model.text.width=64", "model.text.layers=1", "model.text.heads=2",
              "model.text.context_length=24")
    openclip_json = tmp_path / "tiny-vit.json"
    openclip_json.write_text(json.dumps({
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2,
                     "layers": 1},
    }))
    for name, extra in (("tables", tables), ("json", (f"model.openclip_config={openclip_json}",))):
        run_dir = tmp_path / name
        result = _run("training.main", *_train_args(corpus, run_dir, "train.steps=2", *extra))
        assert result.returncode == 0, result.stderr
        trained = load_trained_model(ckpt.latest_checkpoint(run_dir))
        assert trained.model_config.embed_dim == 64
        assert len(trained.model.visual.trunk.blocks) == 2 and len(trained.model.text.blocks) == 1
        # the tokenizer follows the shorter text tower
        assert trained.tokenizer.context_length == trained.model_config.text.context_length == 24


def test_wandb_key_without_network_falls_back_to_offline_in_seconds(corpus, tmp_path):
    """A configured key and no way to W&B's server: one line, offline logging, the run goes on;
    the key appears nowhere in the output. The "server" is a closed port on 127.0.0.1."""
    import os
    import socket
    import subprocess
    import sys
    import time

    from trainer_cli import REPO_ROOT, subprocess_env

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    key = "0123456789abcdef0123456789abcdef01234567"
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("WANDB_")}
    env.update(WANDB_API_KEY=key, WANDB_BASE_URL=f"http://127.0.0.1:{port}",
               WANDB_DIR=str(tmp_path), HOME=str(tmp_path))
    run_dir = tmp_path / "run"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "training.main", *_train_args(corpus, run_dir, "train.steps=2",
                                                              "log.wandb=true")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "server does not answer; logging offline" in output
    assert key not in output and "Traceback" not in output
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline W&B run was written"
    assert time.monotonic() - started < 120  # was ~107 s of waiting before failing


def test_fresh_resume_and_skipped_samples_are_said_in_one_line_each(corpus, tmp_path):
    # checkpoint.resume=latest in an empty run folder starts afresh, and says so.
    result = _run("training.main", *_train_args(corpus, tmp_path / "run", "train.steps=1",
                                                  "checkpoint.resume=latest"))
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stdout.splitlines() if "checkpoint.resume=latest" in line]
    assert len(said) == 1 and "starting from step 0" in said[0]

    # A shard with unreadable samples: the epoch still counts sizes.json's samples; say so once.
    shards = tmp_path / "shards"
    shards.mkdir()
    source = sorted((corpus / "train").glob("*.tar"))[0]
    with tarfile.open(source) as good, tarfile.open(shards / "00000.tar", "w") as out:
        for member in good.getmembers()[:150]:  # 50 samples
            data = good.extractfile(member).read()
            if member.name.endswith(".jpg") and int(member.name.split(".")[0][-2:]) % 5 == 0:
                data = b"not a jpeg"
            member.size = len(data)
            out.addfile(member, io.BytesIO(data))
    (shards / "sizes.json").write_text(json.dumps({"00000.tar": 50}))
    args = _train_args(corpus, tmp_path / "run2", "train.steps=3", f"tokenizer={corpus / 'tokenizer.json'}")
    args = [a if not a.startswith("data.train_shards=") else f"data.train_shards={shards}" for a in args]
    result = _run("training.main", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    notes = [line for line in result.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "unreadable samples skipped" in notes[0] and "50 samples" in notes[0]


@pytest.mark.parametrize("extra", [
    ("loss.name=siglip",),
    ("loss.name=soft_clip",),
    ("loss.tiled=true", "loss.tile_size=4"),
    ("loss.name=siglip", "loss.tiled=true", "loss.tile_size=4"),
    ("train.accum_steps=2",),
], ids=["siglip", "soft_clip", "tiled_clip", "tiled_siglip", "accum2"])
def test_every_loss_and_accumulation_through_the_trainer(corpus, tmp_path, extra):
    run_dir = tmp_path / "run"
    result = _run("training.main", *_train_args(corpus, run_dir, "train.steps=3", *extra))
    assert result.returncode == 0, result.stderr[-2000:]
    values = _losses(run_dir)
    assert len(values) == 3 and all(math.isfinite(v) for v in values)
    state = torch.load(ckpt.latest_checkpoint(run_dir), weights_only=True)
    accum = 2 if "train.accum_steps=2" in extra else 1
    assert state["metrics"]["samples_seen"] == 3 * 16 * accum  # batch 16 per micro-batch
    if "loss.name=siglip" in extra:
        assert "logit_bias" in state["model"]  # the model got SigLIP's bias
