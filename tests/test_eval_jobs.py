"""Eval jobs end to end from real checkpoints: the demo suite, zero-shot on fake CIFAR (checked
against a brute-force recomputation), retrieval from a CSV, the linear probe, the watcher, search
and the in-training hook.

`trained_run` trains the tiny model for 6 steps on the demo corpus with a checkpoint every 2
steps (once per session, ~30 s); its checkpoints are read-only for the tests.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval import run as eval_run
from eval import search as eval_search
from eval.config import InferenceConfig
from eval.datasets import load_prompts
from eval.demo import evaluate_demo, zero_shot_during_training
from eval.watch import FINISHED_MARKER
from test_eval_datasets import write_fake_cifar10, write_fake_cifar100
from training import checkpoint as ckpt
from training.model.trained import load_trained_model
from training.data.transforms import build_eval_transform

STEPS = (2, 4, 6)


@pytest.fixture(autouse=True)
def one_torch_thread():
    # The test machines are small and shared: two spinning OpenMP threads fighting other jobs
    # for two cores made the text tower ~10x slower than one thread. Restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}.pt"


def _result(out: Path, step: int, name: str) -> dict:
    return json.loads((out / f"step_{step:08d}" / f"{name}.json").read_text())


def test_demo_suite_end_to_end(trained_run, demo_shards, tmp_path, capsys):
    assert eval_run.main(["--checkpoint", str(trained_run), "--demo", str(demo_shards),
                          "--workers", "0", "--precision", "fp32",  # as the brute force below
                          "--out", str(tmp_path)]) == 0
    heldout = _result(tmp_path, 6, "demo_heldout.zeroshot_classification")
    assert heldout["num_images"] == 64 and heldout["step"] == 6
    assert heldout["chance"]["acc1"] == pytest.approx(1 / 48)
    assert heldout["chance"]["heldout_acc1"] == pytest.approx(1 / 8)
    assert set(heldout["metrics"]) >= {"acc1", "acc5", "mean_per_class_recall", "heldout_acc1",
                                       "colour_acc1", "shape_acc1"}
    expected = _brute_force_demo(_checkpoint(trained_run, 6), demo_shards)
    for name, value in expected.items():
        assert heldout["metrics"][name] == pytest.approx(value, abs=1e-9), name
    retrieval = _result(tmp_path, 6, "demo_val.zeroshot_retrieval")
    assert retrieval["num_images"] == 64 and retrieval["details"]["texts"] == 64
    assert retrieval["chance"]["image_retrieval_recall@10"] == pytest.approx(10 / 64)
    out = capsys.readouterr().out
    assert "demo_heldout" in out and "heldout_acc1" in out and "chance" in out
    assert (tmp_path / "metrics.png").is_file()


def _brute_force_demo(checkpoint: Path, root: Path) -> dict[str, float]:
    """The demo's held-out metrics recomputed the plain way, from corpus.json and the tar
    members, one image at a time: the known answers the suite must reproduce."""
    from data_pipeline.shard_format import BadSample, decode_image, decode_metadata, read_shard

    trained = load_trained_model(checkpoint)
    model, tokenizer = trained.model, trained.tokenizer
    corpus = json.loads((root / "corpus.json").read_text())
    classes, templates = corpus["classes"], corpus["prompt_templates"]
    held_out = [i for i, c in enumerate(classes) if c["held_out"]]
    transform = build_eval_transform(trained.image_size)
    hits = {"acc1": 0, "colour_acc1": 0, "shape_acc1": 0, "heldout_acc1": 0}
    n = 0
    with torch.no_grad():
        weights = []
        for c in classes:
            mean = model.encode_text(tokenizer([t.format(c["name"]) for t in templates])).mean(0)
            weights.append(mean / mean.norm())
        weights = torch.stack(weights)
        for shard in sorted((root / "heldout").glob("*.tar")):
            for raw in read_shard(str(shard)):
                try:
                    pil = decode_image(raw)
                except BadSample:
                    continue  # the suite skips undecodable images too
                meta = decode_metadata(raw)
                truth = next(i for i, c in enumerate(classes)
                             if (c["colour"], c["shape"]) == (meta["colour"], meta["shape"]))
                image = model.encode_image(transform(pil)[None])[0]
                scores = weights @ image
                best = classes[int(scores.argmax())]
                hits["acc1"] += best is classes[truth]
                hits["colour_acc1"] += best["colour"] == classes[truth]["colour"]
                hits["shape_acc1"] += best["shape"] == classes[truth]["shape"]
                hits["heldout_acc1"] += held_out[int(scores[held_out].argmax())] == truth
                n += 1
    return {k: v / n for k, v in hits.items()}


def _brute_force_zero_shot(checkpoint: Path, folder: Path) -> dict[str, float]:
    """CIFAR-10 zero-shot recomputed the plain way: one prompt, one image at a time."""
    trained = load_trained_model(checkpoint)
    model, tokenizer = trained.model, trained.tokenizer
    prompts = load_prompts("cifar10")
    with torch.no_grad():
        weights = []
        for name in prompts["classes"]:
            feats = torch.cat([model.encode_text(tokenizer([t.format(name)])) for t in prompts["templates"]])
            mean = feats.mean(0)
            weights.append(mean / mean.norm())
        weights = torch.stack(weights)
        import pickle
        with open(folder / "test_batch", "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        transform = build_eval_transform(trained.image_size)
        hits1 = hits5 = 0
        for row, label in zip(batch[b"data"], batch[b"labels"]):
            pixels = np.asarray(row, dtype=np.uint8).reshape(3, 32, 32).transpose(1, 2, 0)
            image = model.encode_image(transform(Image.fromarray(pixels))[None])[0]
            ranking = (weights @ image).argsort(descending=True).tolist()
            hits1 += ranking[0] == label
            hits5 += label in ranking[:5]
    n = len(batch[b"labels"])
    return {"acc1": hits1 / n, "acc5": hits5 / n}


def _brute_force_probe(checkpoint: Path, folder: Path, c: float) -> float:
    """The probe's test accuracy recomputed from the pickles, one image at a time: normalised
    features, scikit-learn's logistic regression refit on every training image at the C the
    probe chose."""
    import pickle

    from sklearn.linear_model import LogisticRegression

    trained = load_trained_model(checkpoint)
    transform = build_eval_transform(trained.image_size)

    def features(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for name in names:
            with open(folder / name, "rb") as handle:
                batch = pickle.load(handle, encoding="bytes")
            for row, label in zip(batch[b"data"], batch[b"labels"]):
                pixels = np.asarray(row, dtype=np.uint8).reshape(3, 32, 32).transpose(1, 2, 0)
                with torch.no_grad():
                    xs.append(trained.model.encode_image(transform(Image.fromarray(pixels))[None])[0])
                ys.append(label)
        return torch.stack(xs).numpy(), np.array(ys)

    train_x, train_y = features([f"data_batch_{i}" for i in range(1, 6)])
    test_x, test_y = features(["test_batch"])
    model = LogisticRegression(C=c, max_iter=1000).fit(train_x, train_y)
    return float((model.predict(test_x) == test_y).mean())


def _write_retrieval_csv(folder: Path) -> Path:
    folder.mkdir()
    rows = ["image,caption"]
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (24, 24), colour).save(folder / f"{i}.png")
        rows += [f"{i}.png,a plain colour {i}", f"{i}.png,a square image {i}"]
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    return folder / "pairs.csv"


def test_cifar_retrieval_and_linear_probe_end_to_end(trained_run, tmp_path, capsys):
    data = tmp_path / "data"
    c10 = write_fake_cifar10(data)
    write_fake_cifar100(data)
    csv = _write_retrieval_csv(tmp_path / "flickr")
    out = tmp_path / "out"
    checkpoint = _checkpoint(trained_run, 6)
    assert eval_run.main([
        "--checkpoint", str(checkpoint), "--suite", "cifar10,cifar100,retrieval,linear_probe",
        "--cifar10", str(data), "--cifar100", str(data), "--retrieval-csv", str(csv),
        "--probe-datasets", "cifar10", "--probe-threads", "1", "--probe-c-grid", "0.1,10,1000",
        "--workers", "0", "--batch-size", "64", "--precision", "fp32",  # brute force below is fp32
        "--out", str(out), "--no-plot",
    ]) == 0
    c10_result = _result(out, 6, "cifar10.zeroshot_classification")
    expected = _brute_force_zero_shot(checkpoint, c10)
    assert c10_result["metrics"]["acc1"] == pytest.approx(expected["acc1"])
    assert c10_result["metrics"]["acc5"] == pytest.approx(expected["acc5"])
    assert c10_result["num_images"] == 20 and c10_result["chance"]["acc1"] == pytest.approx(0.1)
    c100 = _result(out, 6, "cifar100.zeroshot_classification")
    assert c100["num_images"] == 20 and c100["details"]["classes"] == 100
    retrieval = _result(out, 6, "pairs.zeroshot_retrieval")
    assert retrieval["num_images"] == 3 and retrieval["details"]["texts"] == 6
    assert retrieval["metrics"]["image_retrieval_recall@5"] == 1.0  # k > 3 images
    probe = _result(out, 6, "cifar10.linear_probe")
    assert probe["details"]["train_images"] == 30 and probe["num_images"] == 20
    assert probe["details"]["best_C"] in (0.1, 10, 1000)
    assert probe["metrics"]["lp_acc1"] == pytest.approx(
        _brute_force_probe(checkpoint, c10, probe["details"]["best_C"]))
    done = json.loads((out / "done.json").read_text())["checkpoints"]["step_00000006.pt"]
    assert set(done["suites"]) == {"cifar10", "cifar100", "retrieval", "linear_probe"}
    # Asked again: recorded as done, nothing re-evaluated.
    capsys.readouterr()
    eval_run.main(["--checkpoint", str(checkpoint), "--suite", "cifar10", "--cifar10", str(data),
                   "--out", str(out), "--workers", "0"])
    assert "already evaluated" in capsys.readouterr().out
    # bf16 autocast runs too (numbers may differ slightly from fp32).
    assert eval_run.main(["--checkpoint", str(checkpoint), "--suite", "cifar10", "--cifar10",
                          str(data), "--precision", "bf16", "--max-images", "8", "--workers", "0",
                          "--out", str(tmp_path / "bf16"), "--no-plot"]) == 0
    assert _result(tmp_path / "bf16", 6, "cifar10.zeroshot_classification")["num_images"] == 8


def _summaries(out: str) -> list[int]:
    """Steps of the summary tables printed (one per checkpoint evaluated)."""
    return [int(step) for step in re.findall(r"^step (\d+)  ", out, flags=re.MULTILINE)]


def test_watcher_evaluates_each_checkpoint_exactly_once(trained_run, demo_shards, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for step in STEPS[:2]:
        shutil.copy(_checkpoint(trained_run, step), run / "checkpoints")
    args = ["--watch", str(run), "--demo", str(demo_shards), "--workers", "0", "--max-wait", "0",
            "--poll", "0.1", "--max-images", "16"]
    assert eval_run.main(args) == 0
    assert _summaries(capsys.readouterr().out) == [2, 4]
    # Training goes on: a new checkpoint, then the run ends.
    shutil.copy(_checkpoint(trained_run, 6), run / "checkpoints")
    (run / FINISHED_MARKER).write_text('{"step": 6}\n')
    assert eval_run.main(args) == 0
    second = capsys.readouterr().out
    assert _summaries(second) == [6]
    assert "training finished; 1 checkpoint(s) evaluated" in second
    done = json.loads((run / "eval" / "done.json").read_text())["checkpoints"]
    assert sorted(done) == [f"step_{s:08d}.pt" for s in STEPS]
    for step in STEPS:
        assert _result(run / "eval", step, "demo_heldout.zeroshot_classification")["step"] == step
    assert (run / "eval" / "metrics.png").is_file() and not (run / "eval" / "watch.lock").exists()


def _first_val_sample(demo_shards: Path) -> tuple[str, bytes, str]:
    shard = sorted((demo_shards / "val").glob("*.tar"))[0]
    members = {}
    with tarfile.open(shard) as tar:
        for member in tar:
            if member.isfile():
                members[member.name] = tar.extractfile(member).read()
    key = sorted(name.split(".")[0] for name in members if name.endswith(".jpg"))[5]
    return key, members[f"{key}.jpg"], members[f"{key}.txt"].decode().strip()


def _all_val_images(demo_shards: Path) -> tuple[list[str], list[Image.Image]]:
    keys, images = [], []
    for shard in sorted((demo_shards / "val").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".jpg"):
                    keys.append(member.name.split(".")[0])
                    images.append(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
    return keys, images


def _printed_hits(out: str, query: str) -> list[tuple[str, float]]:
    block = out.split(f'query: "{query}"')[1].split("query:")[0]
    rows = [line.split() for line in block.splitlines() if line.strip() and line.split()[0].isdigit()]
    return [(row[2], float(row[1])) for row in rows]


def test_search_finds_planted_image_and_ranks_like_brute_force(trained_run, demo_shards, tmp_path, capsys):
    key, jpg, caption = _first_val_sample(demo_shards)
    planted = tmp_path / "planted.jpg"
    planted.write_bytes(jpg)  # the very bytes stored in the shard: identical features
    args = ["--checkpoint", str(trained_run), "--shards", str(demo_shards / "val"), caption,
            "--image", str(planted), "--top-k", "5", "--cache", str(tmp_path / "cache"),
            "--out", str(tmp_path / "grids"), "--workers", "0", "--precision", "fp32"]
    assert eval_search.main(args) == 0  # fp32: the direct computation below is fp32
    out = capsys.readouterr().out
    image_hits = _printed_hits(out, "image: planted.jpg")
    assert image_hits[0][0] == key and image_hits[0][1] > 0.9999
    # The text query ranks images exactly as a direct computation does.
    trained = load_trained_model(_checkpoint(trained_run, 6))
    keys, images = _all_val_images(demo_shards)
    transform = build_eval_transform(trained.image_size)
    with torch.no_grad():
        feats = trained.model.encode_image(torch.stack([transform(i) for i in images]))
        query = trained.model.encode_text(trained.tokenizer([caption]))[0]
    scores = feats @ query
    expected = [keys[i] for i in scores.argsort(descending=True)[:5].tolist()]
    text_hits = _printed_hits(out, caption)
    assert [k for k, _ in text_hits] == expected
    assert [s for _, s in text_hits] == pytest.approx(sorted(scores.tolist(), reverse=True)[:5], abs=1e-4)
    assert len(list((tmp_path / "grids").glob("*.png"))) == 2
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    # Second run: the index comes from the cache, the answers are the same.
    assert eval_search.main(args) == 0
    again = capsys.readouterr().out
    assert "(cache " in again and _printed_hits(again, caption) == text_hits


def test_in_training_hook_matches_the_demo_suite(trained_run, demo_shards):
    trained = load_trained_model(_checkpoint(trained_run, 6))
    trained.model.train()
    metrics = zero_shot_during_training(trained.model, trained.tokenizer, demo_shards,
                                        trained.image_size, max_images=32)
    assert trained.model.training  # mode restored
    assert set(metrics) == {"zeroshot/demo_heldout/acc1", "zeroshot/demo_heldout/heldout_acc1",
                            "zeroshot/demo_val/acc1"}
    # The same images through the eval job give the same numbers.
    trained.model.eval()
    results = evaluate_demo(trained, demo_shards, InferenceConfig(workers=0, max_images=32, precision="fp32"))
    by_name = {r.dataset: r.metrics for r in results if r.task == "zeroshot_classification"}
    assert metrics["zeroshot/demo_heldout/acc1"] == pytest.approx(by_name["demo_heldout"]["acc1"])
    heldout = by_name["demo_heldout"]
    assert metrics["zeroshot/demo_heldout/heldout_acc1"] == pytest.approx(heldout["heldout_acc1"])
    assert metrics["zeroshot/demo_val/acc1"] == pytest.approx(by_name["demo_val"]["acc1"])


def test_missing_dataset_is_one_line_on_the_cli(run_cli, tmp_path):
    result = run_cli("eval.run", "--checkpoint", str(tmp_path / "nope.pt"), "--suite", "cifar10",
                     "--cifar10", str(tmp_path / "no_cifar"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --cifar10 ")
    assert "cifar-10-batches-py" in lines[0] and "Traceback" not in result.stderr


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_truncated_and_hostile_checkpoints_are_one_line_everywhere(trained_run, demo_shards,
                                                                    run_cli, tmp_path):
    good = _checkpoint(trained_run, 6)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    marker = tmp_path / "code_ran"
    hostile = tmp_path / "hostile.pt"
    torch.save({"format_version": 1, "model": _RunsCode(marker)}, hostile)
    # Every entry point on the truncated file; the hostile one through the CLI and the loader all
    # of them share (each subprocess costs a torch import).
    for bad, entry_points in ((truncated, 4), (hostile, 1)):
        commands = [
            ("eval.run", "--checkpoint", str(bad), "--demo", str(demo_shards), "--workers", "0"),
            ("eval.search", "--checkpoint", str(bad), "--shards", str(demo_shards / "val"),
             "--no-cache", "a red circle"),
            ("training.interop.export", "--checkpoint", str(bad), "--out", str(tmp_path / "x")),
            ("training.main", "--config", "configs/tiny_demo.toml",
             f"data.train_shards={demo_shards / 'train'}", f"train.run_dir={tmp_path / 'r'}",
             f"tokenizer={trained_run.parent / 'tokenizer.json'}", f"checkpoint.resume={bad}"),
        ][:entry_points]
        for command in commands:
            result = run_cli(*command)
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2, (command[0], result.stderr[-2000:])
            assert lines[-1].startswith(f"error: {bad}: not a loadable checkpoint"), (command[0], lines)
            assert "Traceback" not in result.stderr and "weights_only=False" not in result.stderr
    with pytest.raises(ckpt.CheckpointError, match="never unpickled here"):
        ckpt.load_checkpoint(hostile)
    assert not marker.exists()


def test_search_on_a_truncated_shard_names_it_and_goes_on(trained_run, demo_shards, run_cli,
                                                          tmp_path):
    shards = tmp_path / "val"
    shards.mkdir()
    source = demo_shards / "val" / "00000.tar"
    (shards / "00000.tar").write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    result = run_cli("eval.search", "--checkpoint", str(_checkpoint(trained_run, 6)),
                     "--shards", str(shards), "--no-cache", "--workers", "0",
                     "--out", str(tmp_path / "grids"), "a red circle")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"shard {shards / '00000.tar'}: unreadable tar" in result.stderr
