"""The DataComp suite on fake CLIP_benchmark webdataset folders made here: group metrics with
known answers, the aggregate against a hand computation, every task's metric against a
brute-force recomputation (one image at a time), missing tasks listed, bad layouts one line."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import f1_score

from conftest import REPO_ROOT
from data_pipeline.errors import UserError
from eval.datacomp import aggregate, locate
from eval.datacomp_tasks import SELECTIONS, TASKS
from eval.metrics import group_accuracy, macro_f1
from eval.results import EvalResult
from eval.wandb_log import wandb_payload
from test_eval_datasets import _write_shard
from test_eval_winogavil import write_winogavil_copy
from training.data.transforms import build_eval_transform
from training.model.trained import load_trained_model

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220),
           "yellow": (230, 220, 30), "purple": (150, 40, 170), "white": (240, 240, 240)}


# -- metrics with known answers ------------------------------------------------------------------


def test_worst_group_accuracy_known_answer():
    hits = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1])
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    worst, per_group = group_accuracy(hits, groups)
    assert per_group == pytest.approx({0: 2 / 3, 1: 1 / 2, 2: 2 / 3})
    assert worst == pytest.approx(1 / 2)
    # FMoW leaves its "Other" region out of the worst: excluding group 1 leaves 2/3.
    assert group_accuracy(hits, groups, exclude=(1,))[0] == pytest.approx(2 / 3)


def test_macro_f1_known_answer_and_sklearn():
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    predictions = torch.tensor([0, 1, 1, 1, 0, 3])
    # class 0: P=1/2 R=1/2 F1=1/2; class 1: P=2/3 R=1 F1=4/5; class 2: never right, F1=0.
    # Class 3 is predicted but never true: it is not averaged (labels = the true classes).
    assert macro_f1(predictions, targets) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 7, 200), rng.integers(0, 9, 200)
    assert macro_f1(torch.tensor(p), torch.tensor(y)) == pytest.approx(
        f1_score(y, p, average="macro", labels=np.unique(y)))


def _result(task, value: float, chance: float) -> tuple:
    metric = task.main_metric
    return task, EvalResult(task.key.replace("/", "-"), "zeroshot_classification", {metric: value},
                            {metric: chance}, 10, {"main_metric": metric})


def test_aggregate_equals_hand_computation():
    by_name = {t.name: t for t in TASKS}
    scored = [
        _result(by_name["ImageNet 1k"], 0.60, 0.001),
        _result(by_name["ImageNet v2"], 0.50, 0.001),
        _result(by_name["ImageNet-R"], 0.70, 0.006163),
        _result(by_name["CIFAR-100"], 0.40, 0.01),
        _result(by_name["SVHN"], 0.20, 0.117897),
        _result(by_name["Flickr"], 0.30, 0.02),
        _result(by_name["GeoDE"], 0.80, 0.025),
    ]
    missing = [t for t in TASKS if t.name not in {t.name for t, _ in scored}]
    summary = aggregate("datacomp", scored, missing)
    assert summary.metrics == pytest.approx({
        "imagenet": 0.60,
        "imagenet_shifts": (0.50 + 0.70) / 2,
        "vtab": (0.40 + 0.20) / 2,
        "retrieval": 0.30,
        "average": (0.60 + 0.50 + 0.70 + 0.40 + 0.20 + 0.30 + 0.80) / 7,
    })
    # Chance comes from tasklist.yml's random_score where it gives one (not from the result).
    assert summary.chance["vtab"] == pytest.approx((0.01 + 0.117897) / 2)
    assert len(summary.details["tasks_missing"]) == 31
    # W&B gets the aggregates beside every task's metrics, on the eval step axis.
    payload = wandb_payload(1000, [r for _, r in scored] + [summary])
    assert payload["eval/step"] == 1000 and payload["eval/vtab-svhn/acc1"] == 0.20
    assert payload["eval/datacomp/average"] == pytest.approx(summary.metrics["average"])


# -- fake task folders ---------------------------------------------------------------------------


def _png(colour: tuple[int, int, int], jitter: int) -> bytes:
    pixels = np.full((40, 40, 3), colour, dtype=np.int16)
    pixels[: 8 + jitter, :] += 15  # a band, so no two images are alike
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _npy(row: list[int]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(row, dtype=np.int64))
    return buffer.getvalue()


def _classification_folder(root: Path, name: str, rows: list[tuple[str, list[int] | None]],
                           shards: int = 2) -> Path:
    folder = root / name
    names = list(COLOURS)
    samples = []
    for i, (colour, meta) in enumerate(rows):
        sample = {"png": _png(COLOURS[colour], i % 7), "cls": str(names.index(colour)).encode()}
        if meta is not None:
            sample["npy"] = _npy(meta)
        samples.append(sample)
    for s in range(shards):
        _write_shard(folder / "test" / f"{s}.tar", samples[s::shards])
    (folder / "test" / "nshards.txt").write_text(f"{shards}\n")
    (folder / "classnames.txt").write_text("\n".join(names) + "\n")
    (folder / "zeroshot_classification_templates.txt").write_text(
        "a photo of a {c} thing.\na {c} picture.\n")
    return folder


def _rows(n: int, meta) -> list[tuple[str, list[int] | None]]:
    names = list(COLOURS)
    return [(names[(i * 5) % len(names)], meta(i)) for i in range(n)]


@pytest.fixture(scope="module")
def wds_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("datacomp_eval")
    _classification_folder(root, "wds_cifar10", _rows(24, lambda i: None))  # CLIP_benchmark name
    _classification_folder(root, "wds_vtab-svhn_test", _rows(18, lambda i: None))  # DataComp's
    _classification_folder(root, "wds_wilds-fmow_test", _rows(30, lambda i: [i % 6, 2015, 0]))
    _classification_folder(root, "wds_geode_test", _rows(20, lambda i: [i % 3, i % 5]))
    _classification_folder(root, "wds_dollar_street_test", _rows(20, lambda i: [i % 4, 0, 0]))
    _classification_folder(root, "wds_wilds-iwildcam_test",
                           _rows(21, lambda i: [i % 3, 0, 0, 0, 0, 0, 0, 0, 0]))
    flickr = root / "wds_flickr30k"
    samples = [{"png": _png(rgb, i), "txt": f"a {name} square\na {name} picture".encode()}
               for i, (name, rgb) in enumerate(COLOURS.items())]
    _write_shard(flickr / "test" / "0.tar", samples)
    (flickr / "test" / "nshards.txt").write_text("1")
    (flickr / "dataset_type.txt").write_text("retrieval\n")
    write_winogavil_copy(root)  # the HF Arrow copy, under hf_cache/ as DataComp's download puts it
    return root


# -- brute force ---------------------------------------------------------------------------------


def _brute_force(checkpoint: Path, folder: Path) -> dict:
    """Logits, targets and metadata of a classification folder, the plain way: every image on
    its own, every prompt on its own, read straight from the tars."""
    trained = load_trained_model(checkpoint)
    model, tokenizer = trained.model, trained.tokenizer
    classnames = (folder / "classnames.txt").read_text().split()
    templates = (folder / "zeroshot_classification_templates.txt").read_text().splitlines()
    transform = build_eval_transform(trained.image_size)
    images, targets, metadata = [], [], []
    for shard in sorted((folder / "test").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for key in sorted({name.split(".")[0] for name in members}):
            images.append(Image.open(io.BytesIO(members[f"{key}.png"])).convert("RGB"))
            targets.append(int(members[f"{key}.cls"]))
            if f"{key}.npy" in members:
                metadata.append(np.load(io.BytesIO(members[f"{key}.npy"])).tolist())
    with torch.no_grad():
        weights = []
        for name in classnames:
            feats = torch.cat([model.encode_text(tokenizer([t.replace("{c}", name)]), normalize=True)
                               for t in templates])
            mean = feats.mean(0)
            weights.append(mean / mean.norm())
        weights = torch.stack(weights)
        feats = torch.cat([model.encode_image(transform(im)[None], normalize=True) for im in images])
    return {"logits": feats @ weights.T, "targets": np.array(targets), "metadata": metadata}


def _worst(hits: np.ndarray, groups: np.ndarray, skip=()) -> float:
    return min(hits[groups == g].mean() for g in np.unique(groups) if g not in skip)


def _task_result(out: Path, step: int, dataset: str, task: str = "zeroshot_classification") -> dict:
    return json.loads((out / f"step_{step:08d}" / f"{dataset}.{task}.json").read_text())


def test_datacomp_suite_end_to_end_matches_brute_force(trained_run, wds_root, tmp_path, run_cli):
    checkpoint = trained_run / "checkpoints" / "step_00000006.pt"
    out = tmp_path / "eval"
    result = run_cli("eval.run", "--checkpoint", str(checkpoint), "--suite", "datacomp",
                     "--wds-root", str(wds_root), "--out", str(out), "--precision", "fp32",
                     "--workers", "0", "--batch-size", "8", "--no-plot")
    assert result.returncode == 0, result.stderr[-2000:]
    printed = result.stdout
    for name in ("CIFAR-10", "SVHN", "FMoW", "GeoDE", "Dollar Street", "iWildCam", "Flickr",
                 "WinoGAViL", "average (8 tasks)", "vtab (1 task)", "retrieval (2 tasks)"):
        assert name in printed, name
    assert "missing (30 of 38)" in printed

    mains = {}
    for dataset, folder in [("cifar10", "wds_cifar10"), ("vtab-svhn", "wds_vtab-svhn_test")]:
        ref = _brute_force(checkpoint, wds_root / folder)
        got = _task_result(out, 6, dataset)
        hits = ref["logits"].argmax(1).numpy() == ref["targets"]
        assert got["metrics"]["acc1"] == pytest.approx(hits.mean(), abs=1e-6)  # fp32 mean
        assert got["num_images"] == len(ref["targets"])
        mains[dataset] = hits.mean()

    ref = _brute_force(checkpoint, wds_root / "wds_wilds-fmow_test")
    got = _task_result(out, 6, "wilds-fmow")["metrics"]
    hits = ref["logits"].argmax(1).numpy() == ref["targets"]
    regions = np.array([m[0] for m in ref["metadata"]])
    assert got["acc_worst_region"] == pytest.approx(_worst(hits, regions, skip=(5,)))
    assert got["acc_avg"] == pytest.approx(hits.mean())

    ref = _brute_force(checkpoint, wds_root / "wds_geode_test")
    hits = ref["logits"].argmax(1).numpy() == ref["targets"]
    got = _task_result(out, 6, "fairness-geode")["metrics"]
    assert got["acc_wg"] == pytest.approx(_worst(hits, np.array([m[0] for m in ref["metadata"]])))

    ref = _brute_force(checkpoint, wds_root / "wds_dollar_street_test")
    top5 = ref["logits"].topk(5, dim=1).indices.numpy()
    hits5 = (top5 == ref["targets"][:, None]).any(1)
    got = _task_result(out, 6, "fairness-dollar_street")["metrics"]
    assert got["acc_top5_wg"] == pytest.approx(
        _worst(hits5, np.array([m[0] for m in ref["metadata"]])))

    ref = _brute_force(checkpoint, wds_root / "wds_wilds-iwildcam_test")
    predictions = ref["logits"].argmax(1).numpy()
    got = _task_result(out, 6, "wilds-iwildcam")["metrics"]
    assert got["F1-macro_all"] == pytest.approx(
        f1_score(ref["targets"], predictions, average="macro", labels=np.unique(ref["targets"])))

    flickr = _task_result(out, 6, "retrieval-flickr30k", "zeroshot_retrieval")["metrics"]
    assert flickr["mean_recall@1"] == pytest.approx(
        (flickr["image_retrieval_recall@1"] + flickr["text_retrieval_recall@1"]) / 2)

    summary = _task_result(out, 6, "datacomp", "aggregate")
    assert summary["metrics"]["vtab"] == pytest.approx(mains["vtab-svhn"])
    assert len(summary["details"]["tasks_present"]) == 8
    assert summary["metrics"]["average"] == pytest.approx(
        np.mean(list(summary["details"]["main_metrics"].values())))

    # Sharded over two gloo ranks: each embeds a slice of every task, features gathered; every
    # result equals the 1-rank run's, and only rank 0 writes (one table printed).
    sharded = tmp_path / "sharded"
    ranks = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "eval.run", "--checkpoint", str(checkpoint), "--suite", "datacomp",
         "--wds-root", str(wds_root), "--out", str(sharded), "--precision", "fp32",
         "--workers", "0", "--batch-size", "8", "--no-plot"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert ranks.returncode == 0, ranks.stdout[-2000:] + ranks.stderr[-3000:]
    assert ranks.stdout.count("datacomp suite on") == 1
    one = sorted(p.relative_to(out) for p in out.glob("step_*/*.json"))
    assert one == sorted(p.relative_to(sharded) for p in sharded.glob("step_*/*.json"))
    for name in one:
        a, b = json.loads((out / name).read_text()), json.loads((sharded / name).read_text())
        assert a["metrics"] == b["metrics"] and a["num_images"] == b["num_images"], name
        assert a["details"].get("acc_by_region") == b["details"].get("acc_by_region"), name

    # A part of the suite: only ImageNet and its shifts, of which none is here -> one line.
    part = run_cli("eval.run", "--checkpoint", str(checkpoint), "--suite", "imagenet_shifts",
                   "--wds-root", str(wds_root), "--out", str(out))
    assert part.returncode == 2 and "Traceback" not in part.stderr
    assert part.stderr.strip().startswith("error: --wds-root") and "imagenet_shifts" in part.stderr


def test_suites_select_their_tasks():
    assert len(SELECTIONS["datacomp"]) == 38
    assert {t.name for t in SELECTIONS["vtab"]} >= {"Caltech-101", "SUN397", "SVHN"}
    assert len(SELECTIONS["vtab"]) == 13 and len(SELECTIONS["imagenet_shifts"]) == 7


def test_bad_layouts_are_one_line(tmp_path, run_cli):
    root = tmp_path / "root"
    folder = _classification_folder(root, "wds_cifar10", _rows(4, lambda i: None), shards=1)
    (folder / "classnames.txt").unlink()
    with pytest.raises(UserError, match="no classnames.txt; expected test/\\*.tar"):
        locate(root, SELECTIONS["datacomp"])
    result = run_cli("eval.run", "--checkpoint", str(tmp_path / "x.pt"), "--suite", "datacomp",
                     "--wds-root", str(root))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "classnames.txt" in lines[0]

    (folder / "classnames.txt").write_text("red\n")
    (folder / "test" / "nshards.txt").write_text("3")
    with pytest.raises(UserError, match="nshards.txt says 3 shards but 2 are missing"):
        locate(root, SELECTIONS["datacomp"])
    (folder / "test" / "nshards.txt").unlink()
    (folder / "zeroshot_classification_templates.txt").write_text("a photo of a {}.\n")
    with pytest.raises(UserError, match="has no \\{c\\}"):
        locate(root, SELECTIONS["datacomp"])

    flickr = root / "wds_flickr30k" / "test"
    _write_shard(flickr / "0.tar", [{"png": _png((1, 2, 3), 0), "txt": b"x"}])
    (folder / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    with pytest.raises(UserError, match="dataset_type.txt is missing"):
        locate(root, SELECTIONS["datacomp"])
    with pytest.raises(UserError, match="no such folder"):
        locate(tmp_path / "nowhere", SELECTIONS["datacomp"])


def test_sharded_watcher_evaluates_each_checkpoint_once(trained_run, wds_root, tmp_path):
    """The watcher under torchrun: rank 0 decides what to evaluate, all ranks evaluate it, rank 0
    records it; every checkpoint of the finished run once, the same numbers as one process."""
    out = tmp_path / "watch"
    common = ["--suite", "vtab", "--wds-root", str(wds_root), "--precision", "fp32",
              "--workers", "0", "--no-plot"]
    ranks = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "eval.run", "--watch", str(trained_run), "--out", str(out), "--poll", "0.2",
         "--max-wait", "5", *common],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert ranks.returncode == 0, ranks.stdout[-2000:] + ranks.stderr[-3000:]
    done = json.loads((out / "done.json").read_text())["checkpoints"]
    assert sorted(done) == ["step_00000002.pt", "step_00000004.pt", "step_00000006.pt"]
    assert ranks.stdout.count("vtab suite on") == 3  # rank 0 alone prints, once per checkpoint
    single = tmp_path / "single"
    one = subprocess.run(
        [sys.executable, "-m", "eval.run", "--checkpoint",
         str(trained_run / "checkpoints" / "step_00000004.pt"), "--out", str(single), *common],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    name = Path("step_00000004") / "vtab-svhn.zeroshot_classification.json"
    assert (json.loads((out / name).read_text())["metrics"]
            == json.loads((single / name).read_text())["metrics"])
