"""The DataComp suite: every one of the 38 tasks found under --wds-root, each scored by its own
metric, and DataComp's aggregates over the tasks present.

    python -m eval.run --checkpoint runs/x --suite datacomp --wds-root ~/datacomp_eval
    python -m eval.run --checkpoint runs/x --suite vtab,imagenet_shifts --wds-root ~/datacomp_eval

Per task (eval.datacomp_tasks says which is which):
    classification  acc1, acc5, mean_per_class_recall (CLIP_benchmark's names)
    wilds           + the group metric of DataComp's evaluators, from each sample's .npy row:
                    iWildCam F1-macro_all; Camelyon17 acc_wg (by slide); FMoW acc_worst_region
                    (region "Other" left out); Dollar Street acc_top5_wg (by income group);
                    GeoDE acc_wg (by region)
    retrieval       image/text recall@1/5/10 and mean_recall@1 (the mean of the two recall@1)
    winogavil       Jaccard index of the chosen and the associated images (eval.winogavil; its
                    copy is the Hugging Face Arrow file, not a webdataset)
One result JSON per task (its main metric named in details), and a `<suite>.aggregate` result
holding the aggregates, the tasks present and the ones missing. Missing tasks are listed, never
fatal; a task folder with the wrong layout stops the run before any model loads, in one line.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from data_pipeline.errors import UserError
from data_pipeline.shard_format import captions
from eval.config import InferenceConfig
from eval.datacomp_tasks import (
    AGGREGATES, FMOW_OTHER_REGION, METADATA_FIELDS, OPENAI_B32_AVERAGE, SELECTIONS, Task,
)
from eval.features import class_embeddings, encode_images
from eval.metrics import (
    classification_chance, classification_metrics, group_accuracy, macro_f1,
)
from eval.results import EvalResult
from eval.retrieval import RetrievalSet, zeroshot_retrieval
from eval.shard_images import ShardImages
from eval.sharding import is_main
from eval.wds_tasks import WdsFolder, find_task_folder, label_and_metadata, read_wds_folder
from eval.winogavil import evaluate_winogavil, find_copy
from training.model.trained import TrainedModel

AGGREGATE_TASK = "aggregate"  # the result `<selection>.aggregate.json`


def locate(root: Path, tasks: tuple[Task, ...]
           ) -> tuple[list[tuple[Task, WdsFolder | list[Path]]], list[Task]]:
    """(tasks found under root with their checked layout, tasks missing). A WinoGAViL copy
    comes as its Arrow files, every other task as its webdataset folder."""
    if not root.is_dir():
        raise UserError(f"--wds-root {root}: no such folder (expected one folder per task in "
                        f"CLIP_benchmark's webdataset layout, e.g. {tasks[0].folder_names[0]}/)")
    found, missing = [], []
    for task in tasks:
        if task.kind == "winogavil":
            source = find_copy(root, task.folder_names)
        else:
            folder = find_task_folder(root, task)
            source = None if folder is None else read_wds_folder(folder, task.kind)
        if source is None:
            missing.append(task)
        else:
            found.append((task, source))
    return found, missing


def check(root: Path | None, selection: str) -> None:
    if root is None:
        raise UserError(f"the {selection} suite needs --wds-root DIR: one folder per task in "
                        f"CLIP_benchmark's webdataset layout (e.g. DIR/wds_imagenet1k/test/0.tar)")
    found, _ = locate(root, SELECTIONS[selection])
    if not found:
        names = ", ".join(t.folder_names[0] for t in SELECTIONS[selection][:3])
        raise UserError(f"--wds-root {root}: none of the {selection} tasks found (looked for "
                        f"folders like {names}, ...)")


def _dataset_name(task: Task) -> str:
    return task.key.replace("/", "-")


def _chance_of_main(task: Task, chance: dict[str, float]) -> float | None:
    return task.random_score if task.random_score is not None else chance.get(task.main_metric)


def _group_metrics(task: Task, logits: torch.Tensor, targets: torch.Tensor,
                   metadata: list) -> tuple[dict[str, float], dict[str, float], dict]:
    """(metrics, their chance, per-group details) of a WILDS-style task."""
    fields, by = METADATA_FIELDS[task.key]
    if any(m is None or len(m) != len(fields) for m in metadata):
        raise UserError(f"{task.name}: every sample needs a .npy metadata row of {len(fields)} "
                        f"values ({', '.join(fields)})")
    groups = torch.tensor([int(m[fields.index(by)]) for m in metadata])
    num_classes = logits.shape[1]
    predictions = logits.argmax(dim=1)
    metrics: dict[str, float] = {}
    chance: dict[str, float] = {}
    if task.key == "wilds/iwildcam":
        metrics["F1-macro_all"] = macro_f1(predictions, targets)
        return metrics, chance, {}
    if task.key == "fairness/dollar_street":
        k = min(5, num_classes)
        hits = (logits.topk(k, dim=1).indices == targets[:, None]).any(dim=1)
        name, chance_value = "acc_top5", k / num_classes
    else:
        hits = predictions == targets
        name, chance_value = "acc", 1 / num_classes
    exclude = (FMOW_OTHER_REGION,) if task.key == "wilds/fmow" else ()
    worst, per_group = group_accuracy(hits, groups, exclude)
    worst_name = f"{name}_worst_region" if task.key == "wilds/fmow" else f"{name}_wg"
    metrics[f"{name}_avg"] = hits.float().mean().item()
    metrics[worst_name] = worst
    chance[f"{name}_avg"] = chance[worst_name] = chance_value
    return metrics, chance, {f"{name}_by_{by}": per_group}


def run_classification(trained: TrainedModel, task: Task, wds: WdsFolder,
                       cfg: InferenceConfig, classifiers: dict | None = None) -> EvalResult:
    """classifiers: class-embedding matrices already built for this checkpoint, keyed by
    (class names, templates): ImageNet, v2 and Sketch share one 1000 x 80-prompt matrix."""
    started = time.perf_counter()
    data = ShardImages(wds.urls, trained.image_size, label_and_metadata)
    features, payloads = encode_images(trained.model, data, cfg, task.name)
    classifiers = {} if classifiers is None else classifiers
    key = (tuple(wds.classnames), tuple(wds.templates))
    if key not in classifiers:
        classifiers[key] = class_embeddings(trained.model, trained.tokenizer, wds.classnames,
                                            wds.templates, cfg)
    classifier = classifiers[key]
    logits = features @ classifier.T
    targets = torch.tensor([label for label, _ in payloads], dtype=torch.long)
    if int(targets.max()) >= len(wds.classnames) or int(targets.min()) < 0:
        raise UserError(f"{wds.folder}: a .cls label is {int(targets.max())}, but "
                        f"classnames.txt lists {len(wds.classnames)} classes")
    metrics = classification_metrics(logits, targets)
    chance = classification_chance(len(wds.classnames))
    details: dict = {}
    if task.kind == "wilds":
        extra, extra_chance, details = _group_metrics(task, logits, targets,
                                                      [meta for _, meta in payloads])
        metrics.update(extra)
        chance.update(extra_chance)
    main_chance = _chance_of_main(task, chance)
    if main_chance is not None:
        chance[task.main_metric] = main_chance
    return EvalResult(
        dataset=_dataset_name(task), task="zeroshot_classification", metrics=metrics,
        chance=chance, num_images=len(targets),
        details={"datacomp_name": task.name, "main_metric": task.main_metric,
                 "classes": len(wds.classnames), "templates": len(wds.templates),
                 "precision": cfg.precision, "max_images": cfg.max_images, **details},
        seconds=time.perf_counter() - started,
    )


def run_retrieval(trained: TrainedModel, task: Task, wds: WdsFolder,
                  cfg: InferenceConfig) -> EvalResult:
    data = RetrievalSet(_dataset_name(task), ShardImages(wds.urls, trained.image_size, captions))
    result = zeroshot_retrieval(trained, data, cfg)
    for values in (result.metrics, result.chance):
        values["mean_recall@1"] = 0.5 * (values["image_retrieval_recall@1"]
                                         + values["text_retrieval_recall@1"])
    result.details.update({"datacomp_name": task.name, "main_metric": task.main_metric})
    return result


def main_value(result: EvalResult) -> float:
    return result.metrics[result.details["main_metric"]]


def aggregate(selection: str, scored: list[tuple[Task, EvalResult]],
              missing: list[Task]) -> EvalResult:
    """DataComp's aggregates (aggregate_scores.py) over the tasks present; each is also given
    for chance (the mean of the tasks' chance levels, where every member has one)."""
    def mean(pairs: list[tuple[Task, EvalResult]], chance: bool) -> float | None:
        values = [(_chance_of_main(t, r.chance) if chance else main_value(r)) for t, r in pairs]
        return None if not values or None in values else sum(values) / len(values)

    members = {
        "imagenet": [(t, r) for t, r in scored if t.key == "imagenet1k"],
        **{group: [(t, r) for t, r in scored if group in t.groups]
           for group in AGGREGATES if group not in ("imagenet", "average")},
        "average": scored,
    }
    metrics, chance, counts = {}, {}, {}
    for name, pairs in members.items():
        if pairs:
            metrics[name] = mean(pairs, chance=False)
            counts[name] = len(pairs)
            level = mean(pairs, chance=True)
            if level is not None:
                chance[name] = level
    return EvalResult(
        dataset=selection, task=AGGREGATE_TASK, metrics=metrics, chance=chance,
        num_images=sum(r.num_images for _, r in scored),
        details={"tasks_present": [t.name for t, _ in scored],
                 "tasks_missing": [t.name for t in missing], "tasks_per_aggregate": counts,
                 "main_metrics": {t.name: main_value(r) for t, r in scored},
                 "openai_vit_b32": {t.name: t.openai_b32 for t, _ in scored},
                 "openai_vit_b32_average_38": OPENAI_B32_AVERAGE,
                 "definitions": {k: v for k, v in AGGREGATES.items() if k in metrics}},
        seconds=sum(r.seconds for _, r in scored),
    )


def format_table(scored: list[tuple[Task, EvalResult]], summary: EvalResult,
                 missing: list[Task]) -> str:
    rows = [("task", "main metric", "value", "chance", "OpenAI B/32")]
    pct = lambda v: "" if v is None else f"{100 * v:6.2f}%"  # noqa: E731
    for task, result in scored:
        rows.append((task.name, task.main_metric, pct(main_value(result)),
                     pct(_chance_of_main(task, result.chance)), pct(task.openai_b32)))
    rows.append(("", "", "", "", ""))
    for name, value in summary.metrics.items():
        count = summary.details["tasks_per_aggregate"][name]
        rows.append((f"{name} ({count} task{'s' if count != 1 else ''})", "aggregate",
                     pct(value), pct(summary.chance.get(name)),
                     pct(OPENAI_B32_AVERAGE) if name == "average" and count == 38 else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if missing:
        lines.append(f"missing ({len(missing)} of {len(scored) + len(missing)}): "
                     + ", ".join(t.name for t in missing))
    return "\n".join(lines)


def run_selection(trained: TrainedModel, root: Path, selection: str,
                  cfg: InferenceConfig) -> list[EvalResult]:
    found, missing = locate(root, SELECTIONS[selection])
    if not found:  # only the retrieval suite gets here so (beside its CSV or shards)
        return []
    scored, classifiers = [], {}
    for task, wds in found:
        if task.kind == "winogavil":
            scored.append((task, evaluate_winogavil(trained, wds, cfg, _dataset_name(task),
                                                    task.main_metric, task.random_score)))
        elif task.kind == "retrieval":
            scored.append((task, run_retrieval(trained, task, wds, cfg)))
        else:
            scored.append((task, run_classification(trained, task, wds, cfg, classifiers)))
    summary = aggregate(selection, scored, missing)
    if is_main():
        print(f"{selection} suite on {root}:\n{format_table(scored, summary, missing)}", flush=True)
    return [result for _, result in scored] + [summary]
