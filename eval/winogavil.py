"""WinoGAViL (Bitton et al. 2022), DataComp's 38th task: pick the images a cue word is about.

Each instance has a cue ("werewolf"), 5, 6, 10 or 12 candidate images, and the k of them that
human players associated with the cue. The model ranks the candidates by the similarity of each
image to the prompt "A werewolf" ("An ..." before a vowel, the cue lower-cased: DataComp's
prompt), keeps its top k, and the instance scores the Jaccard index of that set with the true
one. DataComp reports the mean over instances (`avg_jaccard_score`), per candidate count
(`jaccard_score_5`, `_6`, `_10`, `_12`) and for 5-6 and 10-12 candidates; its main metric is
`jaccard_score_10-12` (tasklist.yml).

The local copy is the Hugging Face dataset `nlphuji/winogavil`, test split, as Arrow: the cache
file `winogavil-test.arrow` that DataComp's `download_evalsets.py` leaves under
`<data root>/hf_cache/nlphuji___winogavil/...`, or a `Dataset.save_to_disk` folder
(`data-*.arrow`). Columns read: `cue`, `candidates`, `associations` and `candidate_images` (HF's
Image feature: a struct of the encoded `bytes` or a `path`). pyarrow reads it; the `datasets`
library is not needed.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import Dataset

from data_pipeline.errors import UserError
from eval.config import InferenceConfig
from eval.features import encode_images, encode_texts
from eval.results import EvalResult
from training.data.transforms import build_eval_transform
from training.model.trained import TrainedModel

LAYOUT = ("the Hugging Face dataset nlphuji/winogavil (test split) as Arrow: winogavil-test.arrow "
          "(as DataComp's download leaves it under hf_cache/nlphuji___winogavil/) or a save_to_disk "
          "folder (data-*.arrow), with columns cue, candidates, associations, candidate_images")
COLUMNS = ("cue", "candidates", "associations", "candidate_images")
# Where a copy may sit under --wds-root besides the task's own folder names.
HF_CACHE_FOLDERS = ("hf_cache/nlphuji___winogavil", "nlphuji___winogavil")
GROUPS = {"5": (5,), "6": (6,), "10": (10,), "12": (12,), "5-6": (5, 6), "10-12": (10, 12)}


@dataclass
class Instance:
    cue: str
    images: list  # per candidate: encoded bytes, or a Path to the image file
    truth: list[bool]  # per candidate: one of the associations


def prompt(cue: str) -> str:
    """DataComp's prompt: "A <cue>", "An <cue>" before a vowel, the cue lower-cased."""
    cue = cue.lower()
    return f"{'An' if cue[:1] in 'aeiou' else 'A'} {cue}"


def jaccard(scores: torch.Tensor, truth: torch.Tensor) -> float:
    """The Jaccard index of the top-k candidates by `scores` with the k true ones."""
    k = int(truth.sum())
    chosen = torch.zeros_like(truth)
    chosen[scores.topk(k).indices] = True
    return (chosen & truth).sum().item() / (chosen | truth).sum().item()


def chance_jaccard(n: int, k: int) -> float:
    """Expected Jaccard index of k candidates drawn at random out of n, k of them true: with i
    true ones drawn (hypergeometric), the index is i / (2k - i)."""
    from math import comb

    return sum(comb(k, i) * comb(n - k, k - i) / comb(n, k) * i / (2 * k - i)
               for i in range(max(0, 2 * k - n), k + 1))


def group_means(values: list[float], sizes: list[int]) -> dict[str, float]:
    """DataComp's metric names: the mean over all instances and per candidate-count group
    (a group with no instance is left out)."""
    out = {"avg_jaccard_score": sum(values) / len(values)}
    for name, members in GROUPS.items():
        picked = [v for v, n in zip(values, sizes) if n in members]
        if picked:
            out[f"jaccard_score_{name}"] = sum(picked) / len(picked)
    return out


def find_copy(root: Path, folder_names: tuple[str, ...]) -> list[Path] | None:
    """The Arrow files of a copy under `root` (the task's folders, then the HF cache folders),
    or None when there is no such folder. A folder without Arrow files, or Arrow files without
    the columns, is a layout error (only the schemas are read here)."""
    for name in (*folder_names, *HF_CACHE_FOLDERS):
        folder = root / name
        if not folder.is_dir():
            continue
        files = sorted(folder.rglob("winogavil-test*.arrow")) or sorted(folder.rglob("data-*.arrow"))
        if not files:
            raise UserError(f"{folder}: no winogavil-test.arrow or data-*.arrow inside; expected "
                            f"{LAYOUT}")
        for path in files:
            _read(path, schema_only=True)
        return files
    return None


def _read(path: Path, schema_only: bool = False) -> pa.Table | pa.Schema:
    """The table (or only its schema) of an Arrow file whose columns are checked. The datasets
    library writes Arrow's streaming format; Arrow's file format is accepted too."""
    for open_reader in (pa.ipc.open_stream, pa.ipc.open_file):
        try:
            with pa.memory_map(str(path)) as source:
                reader = open_reader(source)
                schema = reader.schema
                absent = [c for c in COLUMNS if c not in schema.names]
                if absent:
                    raise UserError(f"{path}: no column {', '.join(absent)}; expected {LAYOUT}")
                return schema if schema_only else reader.read_all()
        except pa.ArrowInvalid:
            continue
    raise UserError(f"{path}: not an Arrow file; expected {LAYOUT}")


def read_instances(files: list[Path]) -> list[Instance]:
    instances = []
    for path in files:
        table = _read(path)
        for row in table.select(list(COLUMNS)).to_pylist():
            candidates, associations = row["candidates"], set(row["associations"])
            images = [_image_source(image, path) for image in row["candidate_images"]]
            if len(images) != len(candidates) or not associations <= set(candidates):
                raise UserError(f"{path}: cue {row['cue']!r}: {len(images)} images for "
                                f"{len(candidates)} candidates, or associations that are not "
                                "candidates")
            instances.append(Instance(row["cue"], images, [c in associations for c in candidates]))
    if not instances:
        raise UserError(f"{files[0].parent}: the Arrow files hold no instance; expected {LAYOUT}")
    return instances


def _image_source(image: dict | None, arrow_file: Path):
    if image and image.get("bytes"):
        return image["bytes"]
    path = Path((image or {}).get("path") or "")
    path = path if path.is_absolute() else arrow_file.parent / path
    if not path.is_file():
        raise UserError(f"{arrow_file}: a candidate image has neither bytes nor a readable path "
                        f"({path})")
    return path


class CandidateImages(Dataset):
    """Every candidate image of every instance; payload (instance, candidate)."""

    def __init__(self, instances: list[Instance], image_size: int) -> None:
        self.slots = [(n, c) for n, inst in enumerate(instances) for c in range(len(inst.images))]
        self.instances = instances
        self.transform = build_eval_transform(image_size)

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, index: int):
        n, c = self.slots[index]
        source = self.instances[n].images[c]
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return self.transform(image.convert("RGB")), (n, c)


def evaluate_winogavil(trained: TrainedModel, files: list[Path], cfg: InferenceConfig,
                       dataset: str = "misc-winogavil", main_metric: str = "jaccard_score_10-12",
                       main_chance: float | None = None) -> EvalResult:
    started = time.perf_counter()
    instances = read_instances(files)
    features, payloads = encode_images(trained.model, CandidateImages(instances, trained.image_size),
                                       cfg, "winogavil")
    cues = encode_texts(trained.model, trained.tokenizer, [prompt(i.cue) for i in instances], cfg)
    by_instance: dict[int, dict[int, torch.Tensor]] = {}
    for row, (n, c) in zip(features, payloads):
        by_instance.setdefault(n, {})[c] = row
    scores, sizes, chances = [], [], []
    for n, inst in enumerate(instances):
        images = torch.stack([by_instance[n][c] for c in range(len(inst.images))])
        truth = torch.tensor(inst.truth)
        scores.append(jaccard(images @ cues[n], truth))
        sizes.append(len(inst.images))
        chances.append(chance_jaccard(len(inst.images), int(truth.sum())))
    metrics = group_means(scores, sizes)
    if main_metric not in metrics:
        raise UserError(f"{files[0]}: no instance with the candidate counts of {main_metric}")
    chance = group_means(chances, sizes)
    if main_chance is not None:
        chance[main_metric] = main_chance  # tasklist.yml's random score, as DataComp reports it
    return EvalResult(
        dataset=dataset, task="zeroshot_association", metrics=metrics, chance=chance,
        num_images=len(payloads),
        details={"datacomp_name": "WinoGAViL", "main_metric": main_metric,
                 "instances": len(instances), "precision": cfg.precision,
                 "instances_per_candidate_count": {str(s): sizes.count(s) for s in sorted(set(sizes))}},
        seconds=time.perf_counter() - started,
    )
