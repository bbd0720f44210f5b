"""Dataset readers on fakes written in the real on-disk formats, and their one-line errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.errors import UserError
from eval.config import DataPaths, LinearProbeConfig
from eval.datasets import (
    load_cifar, load_imagefolder, load_imagenet, load_prompts, split_folders,
)
from eval.retrieval import load_retrieval_csv
from eval.suites import check_suites, parse_suites

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _pickle(path: Path, data: dict) -> None:
    # The real files are Python 2 pickles: str keys come back as bytes under encoding="bytes".
    with open(path, "wb") as handle:
        pickle.dump({k.encode(): v for k, v in data.items()}, handle, protocol=2)


def _rows(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def write_fake_cifar10(root: Path, per_batch: int = 6, test: int = 20, seed: int = 0) -> Path:
    """cifar-10-batches-py/ with 5 training batches, test_batch and batches.meta."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    _pickle(folder / "batches.meta", {"label_names": [n.encode() for n in CIFAR10_NAMES],
                                      "num_cases_per_batch": per_batch, "num_vis": 3072})
    for i in range(1, 6):
        labels = [int(x) for x in rng.integers(0, 10, per_batch)]
        _pickle(folder / f"data_batch_{i}", {"batch_label": f"training batch {i} of 5".encode(),
                                             "labels": labels, "data": _rows(rng, per_batch),
                                             "filenames": [b"x.png"] * per_batch})
    labels = [i % 10 for i in range(test)]
    _pickle(folder / "test_batch", {"batch_label": b"testing batch 1 of 1", "labels": labels,
                                    "data": _rows(rng, test), "filenames": [b"x.png"] * test})
    return folder


def write_fake_cifar100(root: Path, train: int = 30, test: int = 20, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine = [n.replace(" ", "_").encode() for n in load_prompts("cifar100")["classes"]]
    _pickle(folder / "meta", {"fine_label_names": fine, "coarse_label_names": [b"c"] * 20})
    for name, n in (("train", train), ("test", test)):
        _pickle(folder / name, {"fine_labels": [int(x) for x in rng.integers(0, 100, n)],
                                "coarse_labels": [0] * n, "data": _rows(rng, n),
                                "filenames": [b"x.png"] * n, "batch_label": name.encode()})
    return folder


def write_image_folder(folder: Path, classes: list[str], per_class: int = 2) -> None:
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (20, 16), (40 * c % 256, 10 * i, 200)).save(folder / name / f"{i}.png")


def test_cifar10_pickles_decode_to_the_right_pixels_and_labels(tmp_path):
    folder = write_fake_cifar10(tmp_path)
    data = _unpickle_raw(folder / "test_batch")
    row = data[b"data"][3]
    # Given the folder's parent (as people unpack the tarball) or the folder itself.
    for root in (tmp_path, folder):
        ds = load_cifar("cifar10", root, image_size=32, with_train=True)
        assert ds.classnames == CIFAR10_NAMES and len(ds.templates) == 18
        assert len(ds.test) == 20 and len(ds.train) == 30
        # Planes: red bytes 0..1023, green 1024..2047, blue 2048..; pixel (y=2, x=5):
        y, x = 2, 5
        expected = [row[c * 1024 + y * 32 + x] for c in range(3)]
        assert ds.test.pixels[3][y, x].tolist() == expected
        image, label = ds.test[3]
        assert label == 3 and image.shape == (3, 32, 32)


def _unpickle_raw(path: Path) -> dict:
    with open(path, "rb") as handle:
        return pickle.load(handle, encoding="bytes")


def test_cifar100_uses_fine_labels_and_clip_names(tmp_path):
    write_fake_cifar100(tmp_path)
    ds = load_cifar("cifar100", tmp_path, image_size=48, with_train=True)
    assert len(ds.classnames) == 100 and "aquarium fish" in ds.classnames
    raw = _unpickle_raw(tmp_path / "cifar-100-python" / "test")
    assert [ds.test[i][1] for i in range(5)] == raw[b"fine_labels"][:5]
    assert ds.test[0][0].shape == (3, 48, 48) and len(ds.train) == 30


def test_imagenet_synset_folders_map_to_standard_indices(tmp_path):
    # A subset of synsets: labels must still be the 1000-class indices, not 0..2.
    write_image_folder(tmp_path / "val", ["n01440764", "n01443537", "n15075141"], per_class=1)
    ds = load_imagenet(tmp_path, image_size=32)  # the parent of val/ is accepted too
    assert [ds.test[i][1] for i in range(3)] == [0, 1, 999]
    assert ds.classnames[0] == "tench" and ds.classnames[999] == "toilet paper"
    assert len(ds.classnames) == 1000 and len(ds.templates) == 80


def test_imagenet_rejects_non_synset_folders(tmp_path):
    write_image_folder(tmp_path, ["n01440764", "n99999999"])
    with pytest.raises(UserError, match="not ImageNet-1k synsets"):
        load_imagenet(tmp_path, image_size=32)


def test_imagefolder_with_class_file_and_train_split(tmp_path):
    write_image_folder(tmp_path / "ds" / "train", ["a_cat", "b_dog"], per_class=3)
    write_image_folder(tmp_path / "ds" / "test", ["a_cat", "b_dog"], per_class=2)
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"classes": ["cat", "dog"], "templates": ["a {} photo"]}))
    ds = load_imagefolder(tmp_path / "ds", 32, names, with_train=True)
    assert ds.name == "ds" and ds.classnames == ["cat", "dog"] and ds.templates == ["a {} photo"]
    assert len(ds.test) == 4 and len(ds.train) == 6
    assert sorted(ds.train[i][1] for i in range(6)) == [0, 0, 0, 1, 1, 1]
    plain = load_imagefolder(tmp_path / "ds", 32)  # no class file: folder names
    assert plain.classnames == ["a cat", "b dog"] and len(plain.templates) == 18


def test_retrieval_csv_groups_captions_per_image(tmp_path):
    for name in ("x.png", "y.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    csv = tmp_path / "pairs.csv"
    csv.write_text("image,caption\nx.png,a cat\ny.png,a dog\nx.png,a small cat\ny.png,\n")
    ds = load_retrieval_csv(csv, 16)
    assert [ds.images[i][1] for i in range(2)] == [["a cat", "a small cat"], ["a dog"]]
    (tmp_path / "bad.csv").write_text("path,text\nx.png,a\n")
    with pytest.raises(UserError, match="missing column"):
        load_retrieval_csv(tmp_path / "bad.csv", 16)


@pytest.mark.parametrize("suite, paths, expected", [
    ("cifar10", {}, "needs --cifar10 DIR: the cifar-10-batches-py folder"),
    ("cifar10", {"cifar10": "/nonexistent/c10"}, "--cifar10 /nonexistent/c10: no such folder"),
    ("cifar100", {"cifar100": "."}, "no test and meta found; expected the cifar-100-python"),
    ("imagenet", {"imagenet": "/nonexistent/in"}, "one folder per synset"),
    ("demo", {"demo": "/nonexistent/demo"}, "no corpus.json"),
    ("retrieval", {}, "--retrieval-csv FILE"),
    ("linear_probe", {}, "needs one of --demo, --cifar10"),
])
def test_missing_dataset_is_one_user_error(suite, paths, expected):
    with pytest.raises(UserError) as caught:
        check_suites(parse_suites(suite), DataPaths(**paths), LinearProbeConfig())
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_split_folders_prefers_val_then_test(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    assert split_folders("--x", tmp_path, "imagefolder") == (tmp_path / "test", tmp_path / "train")
    (tmp_path / "val").mkdir()
    assert split_folders("--x", tmp_path, "imagefolder")[0] == tmp_path / "val"


def test_prompt_files_hold_clip_lists():
    imagenet = load_prompts("imagenet1k")
    assert len(imagenet["classes"]) == 1000 and len(imagenet["templates"]) == 80
    assert imagenet["wnids"] == sorted(imagenet["wnids"]) and len(set(imagenet["wnids"])) == 1000
    assert all("{}" in t for t in imagenet["templates"])
    for name, n in (("cifar10", 10), ("cifar100", 100)):
        prompts = load_prompts(name)
        assert len(prompts["classes"]) == n and len(prompts["templates"]) == 18
        assert "github.com/openai/CLIP" in prompts["source"]


def _write_shard(path: Path, samples: list[dict[str, bytes]]) -> None:
    import io
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i, members in enumerate(samples):
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _png(colour: tuple[int, int, int]) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (12, 12), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_imagenet_shards_with_cls_labels(tmp_path):
    _write_shard(tmp_path / "in" / "00000.tar", [
        {"png": _png((255, 0, 0)), "cls": b"7"},
        {"png": _png((0, 255, 0)), "cls": b"999"},
        {"png": _png((0, 0, 255))},  # no label: left out
    ])
    ds = load_imagenet(tmp_path / "in", image_size=16)
    items = list(ds.test)
    assert [label for _, label in items] == [7, 999] and items[0][0].shape == (3, 16, 16)


def test_retrieval_shards_take_every_caption_line(tmp_path):
    from eval.retrieval import load_retrieval_shards

    _write_shard(tmp_path / "flickr" / "00000.tar", [
        {"jpg": _png((1, 2, 3)), "txt": b"a dog runs\n\na brown dog\n"},
        {"jpg": _png((4, 5, 6)), "txt": b"ignored", "json": b'{"captions": ["one", "two"]}'},
    ])
    ds = load_retrieval_shards(str(tmp_path / "flickr"), 16)
    assert ds.name == "flickr"
    assert [caps for _, caps in ds.images] == [["a dog runs", "a brown dog"], ["one", "two"]]


class _RunsCode:
    """What a crafted pickle does: name a callable (here `os.system`) to be called on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_cifar_folder_cannot_run_code(tmp_path):
    folder = write_fake_cifar10(tmp_path)
    marker = tmp_path / "ran"
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"labels": [0], b"data": _RunsCode(marker)}, handle, protocol=2)
    with pytest.raises(UserError, match=r"test_batch: not a CIFAR batch file \(refusing to load"):
        load_cifar("cifar10", tmp_path, 32)
    assert not marker.exists()
    # the genuine format (numpy arrays, lists, bytes) still reads
    write_fake_cifar10(tmp_path / "ok")
    assert len(load_cifar("cifar10", tmp_path / "ok", 32).test) == 20
