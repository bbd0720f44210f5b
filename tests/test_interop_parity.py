"""Our eval numbers against CLIP_benchmark's, on the same checkpoint and the same data.

One randomly initialised OpenCLIP ViT-B-32-quickgelu checkpoint file is evaluated twice:
CLIP_benchmark loads it with its own loader (OpenCLIP model, transform and tokenizer) and scores
it with its own datasets and metrics; we import it (training.interop) and score it with eval/.
The data is generated here: a fake CIFAR-10 in the real Python-2 pickle format, read by
torchvision's CIFAR10 on their side (as `clip_benchmark eval --dataset cifar10` does) and by
eval.datasets on ours, and a small image-caption set in the layout of CLIP_benchmark's Flickr
reader, which is also a valid --retrieval-csv. Zero-shot predictions must agree image by image,
retrieval recall@k hit by hit.
"""

from __future__ import annotations

import json
import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
from clip_benchmark.datasets.builder import build_dataset, get_dataset_collate_fn
from clip_benchmark.datasets.flickr import Flickr
from clip_benchmark.metrics import zeroshot_classification as bench_zeroshot
from clip_benchmark.metrics import zeroshot_retrieval as bench_retrieval
from clip_benchmark.models import load_clip
from PIL import Image
from sklearn.metrics import balanced_accuracy_score
from torch.utils.data import DataLoader

from eval import run as eval_run
from eval.config import InferenceConfig
from eval.datasets import load_cifar
from eval.metrics import classification_metrics
from eval.zeroshot import zeroshot_logits
from training.interop.import_checkpoint import import_pretrained

from test_interop_layout import CLIP_BPE, openclip_reference

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"]
TEST_IMAGES = 100
BATCH = 25
# CLIP_benchmark's CLI runs in autocast unless --no_amp; parity is measured in fp32 on both sides.
INFER = InferenceConfig(batch_size=BATCH, workers=0, precision="fp32", device="cpu")


class _Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` records, as the real CIFAR files (pickled by Python 2) hold
    them: they load as bytes with encoding="bytes" (our reader) and as str with
    encoding="latin1" (torchvision's). Python 3's own protocol-2 bytes would stay bytes."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_python2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_python2_str


def _write_python2_pickle(path, data: dict) -> None:
    with open(path, "wb") as handle:
        _Python2Pickler(handle, protocol=2).dump({k.encode(): v for k, v in data.items()})


def write_cifar10(root, seed: int = 0) -> None:
    """cifar-10-batches-py with a TEST_IMAGES-image test batch (10 per class) and one image per
    training batch (present because torchvision checks that every file of the set exists)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    _write_python2_pickle(folder / "batches.meta", {
        "num_cases_per_batch": TEST_IMAGES, "num_vis": 3072,
        "label_names": [n.encode() for n in CIFAR10_NAMES]})
    labels = [i % 10 for i in range(TEST_IMAGES)]
    # Smooth colour fields plus noise: CIFAR-like statistics, different for every image.
    base = rng.integers(0, 256, (TEST_IMAGES, 3, 1, 1))
    noise = rng.normal(0, 40, (TEST_IMAGES, 3, 32, 32))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8).reshape(TEST_IMAGES, 3072)
    _write_python2_pickle(folder / "test_batch", {
        "batch_label": b"testing batch 1 of 1", "labels": labels, "data": pixels,
        "filenames": [f"img_{i}.png".encode() for i in range(TEST_IMAGES)]})
    for i in range(1, 6):
        _write_python2_pickle(folder / f"data_batch_{i}", {
            "batch_label": f"training batch {i} of 5".encode(), "labels": [0],
            "data": pixels[:1], "filenames": [b"train.png"]})


def write_captioned_images(folder, seed: int = 1):
    """12 JPEGs with 1-3 captions each; the annotation file is CLIP_benchmark's Flickr format
    ("image,caption" header, then `NAME.jpg,caption` lines), which is also our --retrieval-csv."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    things = ["circle", "square", "star", "dog", "boat", "tree"]
    lines = ["image,caption"]
    for i in range(12):
        pixels = np.clip(rng.integers(0, 256, (1, 1, 3)) + rng.normal(0, 30, (48, 64, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img_{i:02d}.jpg", quality=90)
        for j in range(1 + i % 3):
            caption = f"a photo of a {colours[(i + j) % 6]} {things[(i * j) % 6]} number {i}"
            lines.append(f"img_{i:02d}.jpg,{caption}")
    annotations = folder / "captions.csv"
    annotations.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return annotations


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """One checkpoint file, loaded by both sides: CLIP_benchmark's loader and our importer."""
    path = tmp_path_factory.mktemp("parity") / "open_clip_pytorch_model.bin"
    torch.save(openclip_reference("ViT-B-32-quickgelu", seed=5).state_dict(), path)
    bench = load_clip(model_type="open_clip", model_name="ViT-B-32-quickgelu",
                      pretrained=str(path), cache_dir=None, device="cpu")
    bench[0].eval()
    return path, bench, import_pretrained(path, "vit_b32_quickgelu", CLIP_BPE)


@pytest.mark.slow
def test_zeroshot_cifar10_equals_clip_benchmark_per_image(checkpoint, tmp_path, monkeypatch):
    _, (bench_model, bench_transform, bench_tokenizer), ours = checkpoint
    write_cifar10(tmp_path)

    # torchvision compares each CIFAR file's md5 with the official archive's, which generated
    # files cannot match; only that check is relaxed to "the file exists" (nothing downloads).
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity",
                        lambda fpath, md5=None: os.path.isfile(fpath))
    dataset = build_dataset("cifar10", root=str(tmp_path), transform=bench_transform,
                            split="test", download=True)
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=False, num_workers=0)
    # CLIP_benchmark's evaluate() = these two steps, then metrics from the logits. Its metric
    # step cannot run here: clip_benchmark 1.6.2's accuracy() calls float() on a 1-element
    # array, a TypeError since numpy 2.4. So its top-k comes from its logits, and its
    # mean_per_class_recall from the sklearn call it makes (balanced_accuracy_score).
    classifier = bench_zeroshot.zero_shot_classifier(
        bench_model, bench_tokenizer, dataset.classes, dataset.templates, "cpu", amp=False)
    their_logits, their_targets = bench_zeroshot.run_classification(
        bench_model, classifier, loader, "cpu", amp=False)
    their_top5 = their_logits.topk(5, dim=1).indices
    theirs = {
        "acc1": (their_top5[:, 0] == their_targets).float().mean().item(),
        "acc5": (their_top5 == their_targets[:, None]).any(dim=1).float().mean().item(),
        "mean_per_class_recall": balanced_accuracy_score(their_targets, their_logits.argmax(1)),
    }

    data = load_cifar("cifar10", tmp_path, ours.image_size)
    assert len(data.templates) == len(dataset.templates) == 18
    assert data.classnames == dataset.classes
    logits, targets = zeroshot_logits(ours, data, INFER)
    metrics = classification_metrics(logits, targets)

    assert torch.equal(targets, their_targets)
    our_pred, their_pred = logits.argmax(1), their_logits.argmax(1)
    assert torch.equal(our_pred, their_pred), f"{(our_pred != their_pred).sum()} images differ"
    # CLIP_benchmark scales the cosines by 100 (OpenAI's fixed scale); we leave them raw.
    diff = (100 * logits - their_logits).abs().max().item()
    assert diff < 1e-4
    assert round(metrics["acc1"] * TEST_IMAGES) == round(theirs["acc1"] * TEST_IMAGES)
    assert round(metrics["acc5"] * TEST_IMAGES) == round(theirs["acc5"] * TEST_IMAGES)
    assert metrics["mean_per_class_recall"] == pytest.approx(theirs["mean_per_class_recall"],
                                                             abs=1e-6)
    top2 = logits.topk(2, dim=1).values
    print(f"\nzero-shot CIFAR-10 parity: {TEST_IMAGES} images, top-1 {metrics['acc1']:.2%} (ours) "
          f"vs {theirs['acc1']:.2%} (CLIP_benchmark), predictions identical for all; "
          f"max |logit diff| x100 {diff:.2e}; smallest top-2 margin x100 "
          f"{100 * (top2[:, 0] - top2[:, 1]).min().item():.2e}")


@pytest.mark.slow
def test_retrieval_recall_equals_clip_benchmark(checkpoint, tmp_path):
    path, (bench_model, bench_transform, bench_tokenizer), _ = checkpoint
    annotations = write_captioned_images(tmp_path / "flickr")
    dataset = Flickr(root=str(tmp_path / "flickr"), ann_file=str(annotations),
                     transform=bench_transform)
    loader = DataLoader(dataset, batch_size=5, shuffle=False, num_workers=0,
                        collate_fn=get_dataset_collate_fn("flickr30k"))
    theirs = bench_retrieval.evaluate(bench_model, loader, bench_tokenizer, device="cpu",
                                      amp=False, recall_k_list=[1, 5, 10])

    # ours through the CLI a user runs on a published checkpoint
    assert eval_run.main([
        "--pretrained", str(path), "--model", "vit_b32_quickgelu", "--bpe", str(CLIP_BPE),
        "--retrieval-csv", str(annotations), "--batch-size", "5", "--workers", "0",
        "--device", "cpu", "--precision", "fp32",  # as CLIP_benchmark with amp=False
        "--out", str(tmp_path / "results"), "--no-plot"]) == 0
    [result_file] = (tmp_path / "results").rglob("captions.zeroshot_retrieval.json")
    result = json.loads(result_file.read_text())
    images, texts = result["num_images"], result["details"]["texts"]
    assert (images, texts) == (len(dataset), sum(len(c) for _, c in dataset.data)) == (12, 24)
    assert set(theirs) == set(result["metrics"])
    for name, value in theirs.items():
        queries = texts if name.startswith("image_retrieval") else images
        # the same number of hits, query by query count
        assert round(result["metrics"][name] * queries) == round(value * queries), name
        assert result["metrics"][name] == pytest.approx(value, abs=1e-6)
    print("\nretrieval parity (12 images, 24 captions): " + ", ".join(
        f"{k} {v:.3f}" for k, v in sorted(result["metrics"].items())))
