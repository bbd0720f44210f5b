"""Classification datasets in the formats people have on disk, all offline.

    CIFAR-10    cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}  (python pickles)
    CIFAR-100   cifar-100-python/{train, test, meta}                            (fine labels)
    ImageNet    val/ of synset folders (n01440764/*.JPEG ...), or webdataset shards with .cls
    ImageFolder one sub-folder per class (optionally under train/ and val/ or test/), class names
                from a file (or the folder names)

Each reader returns a `ClassificationSet`: class names and prompt templates (the CLIP paper's,
from eval/templates/*.json, for the named datasets), the test images and, where the format has
one, the training images for the linear probe. A path that does not hold the expected layout is
a UserError naming the layout, so the CLI prints one line instead of a traceback.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data_pipeline.errors import UserError
from data_pipeline.shard_format import class_label, is_url
from eval.shard_images import ShardImages, shard_urls
from training.data.sources import SOURCE_SEPARATOR
from training.data.transforms import build_eval_transform

TEMPLATES_DIR = Path(__file__).parent / "templates"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_WNID = re.compile(r"^n\d{8}$")

LAYOUTS = {
    "cifar10": "the cifar-10-batches-py folder (data_batch_1..5, test_batch, batches.meta, as "
               "unpacked from cifar-10-python.tar.gz) or the folder holding it",
    "cifar100": "the cifar-100-python folder (train, test, meta, as unpacked from "
                "cifar-100-python.tar.gz) or the folder holding it",
    "imagenet": "ImageNet val as one folder per synset (n01440764/, n01443537/, ...; the folder "
                "itself or its parent holding val/), or a folder of webdataset .tar shards with "
                ".cls labels",
    "imagefolder": "one sub-folder of images per class (the folder itself, or train/ plus val/ "
                   "or test/ inside it)",
}


@dataclass
class ClassificationSet:
    name: str
    classnames: list[str]
    templates: list[str]
    test: Dataset  # yields (image tensor, label)
    train: Dataset | None = None  # for the linear probe


def load_prompts(name: str) -> dict[str, Any]:
    """eval/templates/NAME.json: {"classes": [...], "templates": [...], "source": ...}."""
    return json.loads((TEMPLATES_DIR / f"{name}.json").read_text(encoding="utf-8"))


def _layout_error(option: str, root: Path, problem: str, layout: str) -> UserError:
    return UserError(f"{option} {root}: {problem}; expected {LAYOUTS[layout]}")


# -- in-memory and on-disk image lists -----------------------------------------------------------


class ArrayImages(Dataset):
    """uint8 images [N, H, W, 3] in memory (CIFAR) with one payload each."""

    def __init__(self, pixels: np.ndarray, payloads: Sequence[Any], image_size: int) -> None:
        self.pixels, self.payloads = pixels, list(payloads)
        self.transform = build_eval_transform(image_size)

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        return self.transform(Image.fromarray(self.pixels[index])), self.payloads[index]


class FileImages(Dataset):
    """Image files with one payload each (ImageFolder, retrieval CSVs)."""

    def __init__(self, paths: Sequence[Path], payloads: Sequence[Any], image_size: int) -> None:
        self.paths, self.payloads = list(paths), list(payloads)
        self.transform = build_eval_transform(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB")), self.payloads[index]


# -- CIFAR ---------------------------------------------------------------------------------------

_CIFAR = {
    # name: (folder, train files, test file, meta file, label key, names key)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                "batches.meta", "labels", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names"),
}


# What a CIFAR batch may reference: numpy's array reconstruction (the module moved to numpy._core
# in numpy 2; protocol 5 pickles rebuild from a buffer), and codecs.encode, which protocol-2
# pickles written by Python 3 use to rebuild bytes. The containers, str and numbers need no
# lookup at all.
_CIFAR_PICKLE_GLOBALS = frozenset({
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
})


class _CifarUnpickler(pickle.Unpickler):
    """Plain `pickle.load` runs whatever a file names (a crafted `cifar-10-batches-py/` ran a
    shell command); this one admits numpy arrays and builtin data only."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _CIFAR_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(path: Path) -> dict[str, Any]:
    """A CIFAR batch (a Python 2 pickle of a dict with bytes keys), read without running code."""
    try:
        with open(path, "rb") as handle:
            data = _CifarUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise UserError(f"{path}: not a CIFAR batch file ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a CIFAR batch file (holds a {type(data).__name__})")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in data.items()}


def cifar_root(option: str, root: Path, name: str) -> Path:
    folder, train_files, test_file, meta_file, *_ = _CIFAR[name]
    if not root.is_dir():
        raise _layout_error(option, root, "no such folder", name)
    for candidate in (root, root / folder):
        if all((candidate / f).is_file() for f in (test_file, meta_file)):
            return candidate
    raise _layout_error(option, root, f"no {test_file} and {meta_file} found", name)


def _cifar_split(folder: Path, files: list[str], label_key: str) -> tuple[np.ndarray, list[int]]:
    pixels, labels = [], []
    for name in files:
        batch = _unpickle(folder / name)
        # Rows are 3072 bytes: the red plane, then green, then blue, each 32x32 row-major.
        pixels.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(int(x) for x in batch[label_key])
    return np.concatenate(pixels).transpose(0, 2, 3, 1).copy(), labels


def load_cifar(name: str, root: Path, image_size: int, with_train: bool = False) -> ClassificationSet:
    option = f"--{name}"
    folder = cifar_root(option, root, name)
    _, train_files, test_file, meta_file, label_key, names_key = _CIFAR[name]
    prompts = load_prompts(name)
    meta_names = _unpickle(folder / meta_file)[names_key]
    if len(meta_names) != len(prompts["classes"]):
        raise _layout_error(option, root, f"{meta_file} lists {len(meta_names)} classes, "
                            f"not {len(prompts['classes'])}", name)
    pixels, labels = _cifar_split(folder, [test_file], label_key)
    train = None
    if with_train:
        missing = [f for f in train_files if not (folder / f).is_file()]
        if missing:
            raise _layout_error(option, root, f"missing training file(s) {missing}", name)
        train_pixels, train_labels = _cifar_split(folder, train_files, label_key)
        train = ArrayImages(train_pixels, train_labels, image_size)
    return ClassificationSet(
        name, list(prompts["classes"]), list(prompts["templates"]),
        ArrayImages(pixels, labels, image_size), train,
    )


# -- ImageFolder and ImageNet --------------------------------------------------------------------


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def split_folders(option: str, root: Path, layout: str) -> tuple[Path, Path | None]:
    """(folder to evaluate on, training folder or None): root/val or root/test with root/train
    beside it, else root itself."""
    if not root.is_dir():
        raise _layout_error(option, root, "no such folder", layout)
    for name in ("val", "test"):
        if (root / name).is_dir():
            train = root / "train"
            return root / name, train if train.is_dir() else None
    return root, None


def _folder_images(
    option: str, folder: Path, label_of: Callable[[str], int], image_size: int, layout: str
) -> FileImages:
    paths, labels = [], []
    for class_dir in _class_dirs(folder):
        label = label_of(class_dir.name)
        for path in _images_under(class_dir):
            paths.append(path)
            labels.append(label)
    if not paths:
        raise _layout_error(option, folder, "no images in class sub-folders", layout)
    return FileImages(paths, labels, image_size)


def _is_shard_spec(spec: str) -> bool:
    path = Path(spec)
    return ("{" in spec or SOURCE_SEPARATOR in spec or is_url(spec) or spec.startswith("pipe:")
            or spec.endswith(".tar") or (path.is_dir() and any(path.glob("*.tar"))))


def imagenet_source(spec: str, wnids: Sequence[str]) -> list[str] | tuple[Path, list[Path]]:
    """Shard URLs, or (synset folder, its class folders) after checking every folder is an
    ImageNet-1k synset. Cheap (no image listing): also used to check the option up front."""
    if _is_shard_spec(spec):
        return shard_urls(spec, "--imagenet")
    root = Path(spec)
    folder, _ = split_folders("--imagenet", root, "imagenet")
    dirs = _class_dirs(folder)
    if not dirs or not all(_WNID.match(d.name) for d in dirs):
        raise _layout_error("--imagenet", root, "no synset folders (n########) found", "imagenet")
    known = set(wnids)
    unknown = [d.name for d in dirs if d.name not in known]
    if unknown:
        raise _layout_error("--imagenet", root, f"{len(unknown)} folders are not ImageNet-1k "
                            f"synsets (e.g. {unknown[0]})", "imagenet")
    return folder, dirs


def load_imagenet(spec: Path | str, image_size: int) -> ClassificationSet:
    prompts = load_prompts("imagenet1k")
    classes, templates = list(prompts["classes"]), list(prompts["templates"])
    source = imagenet_source(str(spec), prompts["wnids"])
    if isinstance(source, list):
        return ClassificationSet("imagenet1k", classes, templates,
                                 ShardImages(source, image_size, class_label))
    # Index = position in the sorted list of all 1000 synsets (the standard label order), so a
    # folder holding only some classes still gets the right labels.
    index = {wnid: i for i, wnid in enumerate(prompts["wnids"])}
    test = _folder_images("--imagenet", source[0], index.__getitem__, image_size, "imagenet")
    return ClassificationSet("imagenet1k", classes, templates, test)


def read_class_file(path: Path) -> tuple[list[str], list[str] | None]:
    """Class names (and optional templates): a .json like eval/templates/*.json, or a text
    file with one class name per line."""
    if not path.is_file():
        raise UserError(f"--imagefolder-classes {path}: no such file")
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("classes"), list):
            raise UserError(f"--imagefolder-classes {path}: expected {{\"classes\": [...], "
                            f"\"templates\": [...] (optional)}}")
        return [str(c) for c in data["classes"]], data.get("templates")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return names, None


def load_imagefolder(
    root: Path, image_size: int, classes_file: Path | None = None, with_train: bool = False
) -> ClassificationSet:
    folder, train_folder = split_folders("--imagefolder", root, "imagefolder")
    dirs = [d.name for d in _class_dirs(folder)]
    if not dirs:
        raise _layout_error("--imagefolder", root, "no class sub-folders", "imagefolder")
    templates = list(load_prompts("cifar10")["templates"])  # CLIP's generic photo prompts
    if classes_file is not None:
        classnames, own_templates = read_class_file(classes_file)
        templates = list(own_templates or templates)
        if len(classnames) != len(dirs):
            raise UserError(f"--imagefolder-classes {classes_file}: {len(classnames)} names for "
                            f"{len(dirs)} class folders in {folder}")
    else:
        classnames = [d.replace("_", " ") for d in dirs]
    label = {d: i for i, d in enumerate(dirs)}

    def label_of(name: str) -> int:
        if name not in label:
            raise UserError(f"--imagefolder {root}: class folder {name!r} of {train_folder} "
                            f"is not among those of {folder}")
        return label[name]

    test = _folder_images("--imagefolder", folder, label_of, image_size, "imagefolder")
    train = None
    if with_train:
        if train_folder is None:
            raise _layout_error("--imagefolder", root, "the linear probe needs train/ beside "
                                f"{folder.name}/", "imagefolder")
        train = _folder_images("--imagefolder", train_folder, label_of, image_size, "imagefolder")
    name = root.name if root.name not in ("val", "test") else root.parent.name
    return ClassificationSet(name or "imagefolder", classnames, templates, test, train)
