"""Eval datasets in CLIP_benchmark's webdataset layout, as its and DataComp's download scripts
leave them (clip_benchmark/datasets/builder.py `build_wds_dataset`; DataComp download_evalsets.py):

    wds_vtab-cifar100_test/
        test/nshards.txt                 number of shards N (optional here: else every test/*.tar)
        test/0.tar ... test/N-1.tar      per sample: an image (.webp/.png/.jpg) and
                                         .cls (class index)             classification
                                         .npy (metadata row)            WILDS / fairness sets
                                         .txt (one caption per line)    retrieval
        classnames.txt                   one class name per line (classification)
        zeroshot_classification_templates.txt   one prompt per line, the class as {c}
        dataset_type.txt                 "retrieval" for retrieval sets (default classification)

`find_task_folder` looks a task up under a root by the names in eval.datacomp_tasks;
`read_wds_folder` checks the layout and says in one line what is missing.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.errors import UserError
from data_pipeline.shard_format import RawSample, class_label
from eval.datacomp_tasks import Task

SPLIT = "test"
CLASSNAMES, TEMPLATES, TYPE_FILE = ("classnames.txt", "zeroshot_classification_templates.txt",
                                    "dataset_type.txt")
LAYOUT = (f"{SPLIT}/*.tar shards (image + .cls, or + .txt captions for retrieval), {CLASSNAMES} "
          f"and {TEMPLATES} for classification, {TYPE_FILE} holding 'retrieval' for retrieval sets")


@dataclass
class WdsFolder:
    folder: Path
    dataset_type: str  # "classification" | "retrieval"
    urls: list[str]
    classnames: list[str]
    templates: list[str]  # positional: "a photo of a {}."


def find_task_folder(root: Path, task: Task) -> Path | None:
    for name in task.folder_names:
        if (root / name).is_dir():
            return root / name
    return None


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _shards(folder: Path) -> list[str]:
    split = folder / SPLIT
    if not split.is_dir():
        raise UserError(f"{folder}: no {SPLIT}/ folder; expected {LAYOUT}")
    count_file = split / "nshards.txt"
    if count_file.is_file():
        try:
            count = int(count_file.read_text().strip())
        except ValueError:
            raise UserError(f"{count_file}: expected one integer (the number of shards)") from None
        shards = [split / f"{i}.tar" for i in range(count)]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise UserError(f"{folder}: {SPLIT}/nshards.txt says {count} shards but "
                            f"{len(missing)} are missing (e.g. {missing[0]})")
    else:
        shards = sorted(split.glob("*.tar"), key=lambda p: (len(p.stem), p.stem))
    if not shards:
        raise UserError(f"{folder}: no shards in {SPLIT}/; expected {LAYOUT}")
    return [str(s) for s in shards]


def read_wds_folder(folder: Path, kind: str) -> WdsFolder:
    """kind: the task's kind (eval.datacomp_tasks.KINDS): retrieval sets need captions, the
    others class names and templates."""
    type_file = folder / TYPE_FILE
    dataset_type = _lines(type_file)[0].lower() if type_file.is_file() else "classification"
    urls = _shards(folder)
    if kind == "retrieval":
        if dataset_type != "retrieval":
            raise UserError(f"{folder}: a retrieval task, but {TYPE_FILE} is "
                            f"{'missing' if not type_file.is_file() else repr(dataset_type)}; "
                            f"expected it to hold 'retrieval' ({LAYOUT})")
        return WdsFolder(folder, dataset_type, urls, [], [])
    missing = [name for name in (CLASSNAMES, TEMPLATES) if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{folder}: no {' or '.join(missing)}; expected {LAYOUT}")
    classnames, templates = _lines(folder / CLASSNAMES), _lines(folder / TEMPLATES)
    if not classnames or not templates:
        raise UserError(f"{folder}: {CLASSNAMES} and {TEMPLATES} must each hold at least one line")
    # CLIP_benchmark's templates name the class {c}; ours fill a positional {}.
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise UserError(f"{folder / TEMPLATES}: template {bad[0]!r} has no {{c}} for the class name")
    return WdsFolder(folder, dataset_type, urls, classnames,
                     [t.replace("{", "{{").replace("}", "}}").replace("{{c}}", "{}")
                      for t in templates])


# -- payloads (module level: dataloader workers pickle them) -------------------------------------


def label_and_metadata(raw: RawSample) -> tuple[int, Any] | None:
    """(class index, the sample's .npy metadata row or None); None leaves an unlabelled sample out."""
    label = class_label(raw)
    if label is None:
        return None
    meta = raw.get("npy")
    if meta is not None:
        try:
            meta = np.load(io.BytesIO(meta), allow_pickle=False).reshape(-1).tolist()
        except ValueError:
            meta = None
    return label, meta
