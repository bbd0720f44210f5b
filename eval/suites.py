"""The registry of eval suites, keyed by the names `--suite` takes.

A suite is two functions: `check(paths, probe)` runs before any checkpoint is loaded and raises
a one-line UserError when its dataset option is missing or holds the wrong layout; `run(ctx)`
evaluates one checkpoint and returns plain results. Adding a suite = one entry in SUITES.

    demo          demo corpus: compositional held-out classification, val classification and
                  retrieval (eval.demo)
    cifar10/100   zero-shot, CLIP's 18 templates
    imagenet      zero-shot ImageNet-1k, CLIP's 80 templates
    imagefolder   zero-shot on any ImageFolder with a class-names file
    retrieval     image<->text recall@k from --retrieval-csv and/or --retrieval-shards
    linear_probe  logistic regression on frozen features (demo, cifar10, cifar100, imagefolder)
    datacomp      DataComp's 38 tasks from --wds-root, each with its own metric, and the
                  aggregates (eval.datacomp); imagenet_shifts and vtab select parts of it, and
                  retrieval scores Flickr/MSCOCO from --wds-root too
    sugarcrepe    caption vs hard negative per category (eval.compositionality)
    winoground    text, image and group scores
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from data_pipeline.errors import UserError
from eval import compositionality, datacomp
from eval.config import PROBE_DATASETS, DataPaths, InferenceConfig, LinearProbeConfig
from eval.datasets import (
    LAYOUTS, ClassificationSet, cifar_root, imagenet_source, load_cifar, load_imagefolder,
    load_imagenet, load_prompts, split_folders,
)
from eval.demo import demo_classification_set, evaluate_demo, read_corpus
from eval.features import encode_images
from eval.linear_probe import linear_probe
from eval.results import EvalResult
from eval.retrieval import load_retrieval_csv, load_retrieval_shards, zeroshot_retrieval
from eval.shard_images import shard_urls
from eval.zeroshot import zeroshot_classification
from training.model.trained import TrainedModel


@dataclass
class EvalContext:
    """What every suite gets for one checkpoint. Test-set features are shared between the
    zero-shot and linear-probe suites of the same dataset (encoded once per checkpoint)."""

    trained: TrainedModel
    infer: InferenceConfig
    paths: DataPaths
    probe: LinearProbeConfig
    _test_features: dict[str, tuple[torch.Tensor, list]] = field(default_factory=dict)

    def test_features(self, data: ClassificationSet) -> tuple[torch.Tensor, list]:
        if data.name not in self._test_features:
            self._test_features[data.name] = encode_images(
                self.trained.model, data.test, self.infer, data.name
            )
        return self._test_features[data.name]


@dataclass(frozen=True)
class Suite:
    check: Callable[[DataPaths, LinearProbeConfig], None]
    run: Callable[[EvalContext], list[EvalResult]]


def _require(option: str, value: object, layout: str) -> None:
    if value is None:
        raise UserError(f"this suite needs {option} DIR: {layout}")


# -- checks --------------------------------------------------------------------------------------


def _check_demo(paths: DataPaths, _: LinearProbeConfig) -> None:
    _require("--demo", paths.demo, "a demo corpus root (corpus.json, train/ val/ heldout/)")
    corpus = read_corpus(paths.demo)
    for split in ("val", "heldout"):
        corpus.split(split)


def _check_cifar(name: str) -> Callable[[DataPaths, LinearProbeConfig], None]:
    def check(paths: DataPaths, _: LinearProbeConfig) -> None:
        _require(f"--{name}", getattr(paths, name), LAYOUTS[name])
        cifar_root(f"--{name}", getattr(paths, name), name)

    return check


def _check_imagenet(paths: DataPaths, _: LinearProbeConfig) -> None:
    _require("--imagenet", paths.imagenet, LAYOUTS["imagenet"])
    imagenet_source(paths.imagenet, load_prompts("imagenet1k")["wnids"])


def _check_imagefolder(paths: DataPaths, _: LinearProbeConfig) -> None:
    _require("--imagefolder", paths.imagefolder, LAYOUTS["imagefolder"])
    split_folders("--imagefolder", paths.imagefolder, "imagefolder")


def _check_retrieval(paths: DataPaths, _: LinearProbeConfig) -> None:
    if paths.retrieval_csv is None and paths.retrieval_shards is None and paths.wds_root is None:
        raise UserError("the retrieval suite needs --retrieval-csv FILE (columns image,caption; "
                        "several rows per image), --retrieval-shards DIR (webdataset shards, "
                        "captions one per line in .txt) or --wds-root DIR (Flickr/MSCOCO in "
                        "CLIP_benchmark's webdataset layout)")
    if paths.wds_root is not None and paths.retrieval_csv is None and paths.retrieval_shards is None:
        datacomp.check(paths.wds_root, "retrieval")  # then it must hold Flickr or MSCOCO
    elif paths.wds_root is not None:
        datacomp.locate(paths.wds_root, datacomp.SELECTIONS["retrieval"])  # layouts, if any
    if paths.retrieval_csv is not None and not paths.retrieval_csv.is_file():
        raise UserError(f"--retrieval-csv {paths.retrieval_csv}: no such file")
    if paths.retrieval_shards is not None:
        shard_urls(paths.retrieval_shards, "--retrieval-shards")


def probe_datasets(paths: DataPaths, probe: LinearProbeConfig) -> list[str]:
    if probe.datasets is not None:
        return list(probe.datasets)
    return [name for name in PROBE_DATASETS if getattr(paths, name) is not None]


_PROBE_CHECKS = {
    "demo": _check_demo,
    "cifar10": _check_cifar("cifar10"),
    "cifar100": _check_cifar("cifar100"),
    "imagefolder": _check_imagefolder,
}


def _check_probe(paths: DataPaths, probe: LinearProbeConfig) -> None:
    names = probe_datasets(paths, probe)
    if not names:
        raise UserError("the linear_probe suite needs one of --demo, --cifar10, --cifar100, "
                        "--imagefolder (a dataset with a training split)")
    for name in names:
        _PROBE_CHECKS[name](paths, probe)


# -- runs ----------------------------------------------------------------------------------------


def _run_demo(ctx: EvalContext) -> list[EvalResult]:
    return evaluate_demo(ctx.trained, ctx.paths.demo, ctx.infer)


def _run_cifar(name: str) -> Callable[[EvalContext], list[EvalResult]]:
    def run(ctx: EvalContext) -> list[EvalResult]:
        data = load_cifar(name, getattr(ctx.paths, name), ctx.trained.image_size)
        return [zeroshot_classification(ctx.trained, data, ctx.infer, ctx.test_features(data))]

    return run


def _run_imagenet(ctx: EvalContext) -> list[EvalResult]:
    data = load_imagenet(ctx.paths.imagenet, ctx.trained.image_size)
    return [zeroshot_classification(ctx.trained, data, ctx.infer, ctx.test_features(data))]


def _run_imagefolder(ctx: EvalContext) -> list[EvalResult]:
    data = load_imagefolder(ctx.paths.imagefolder, ctx.trained.image_size,
                            ctx.paths.imagefolder_classes)
    return [zeroshot_classification(ctx.trained, data, ctx.infer, ctx.test_features(data))]


def _run_retrieval(ctx: EvalContext) -> list[EvalResult]:
    sources = []
    if ctx.paths.retrieval_csv is not None:
        sources.append(load_retrieval_csv(ctx.paths.retrieval_csv, ctx.trained.image_size))
    if ctx.paths.retrieval_shards is not None:
        sources.append(load_retrieval_shards(ctx.paths.retrieval_shards, ctx.trained.image_size))
    results = [zeroshot_retrieval(ctx.trained, data, ctx.infer) for data in sources]
    if ctx.paths.wds_root is not None:
        results += datacomp.run_selection(ctx.trained, ctx.paths.wds_root, "retrieval", ctx.infer)
    return results


def _check_sugarcrepe(paths: DataPaths, _: LinearProbeConfig) -> None:
    _require("--sugarcrepe", paths.sugarcrepe, compositionality.SUGARCREPE_LAYOUT)
    compositionality.sugarcrepe_files(paths.sugarcrepe, paths.sugarcrepe_images)


def _check_winoground(paths: DataPaths, _: LinearProbeConfig) -> None:
    _require("--winoground", paths.winoground, compositionality.WINOGROUND_LAYOUT)
    compositionality.winoground_examples(paths.winoground)


def _datacomp_suite(selection: str) -> Suite:
    def check(paths: DataPaths, _: LinearProbeConfig) -> None:
        datacomp.check(paths.wds_root, selection)

    def run(ctx: EvalContext) -> list[EvalResult]:
        return datacomp.run_selection(ctx.trained, ctx.paths.wds_root, selection, ctx.infer)

    return Suite(check, run)


def _probe_set(ctx: EvalContext, name: str) -> ClassificationSet:
    size = ctx.trained.image_size
    if name == "demo":
        return demo_classification_set(read_corpus(ctx.paths.demo), size, with_train=True)
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, getattr(ctx.paths, name), size, with_train=True)
    return load_imagefolder(ctx.paths.imagefolder, size, ctx.paths.imagefolder_classes,
                            with_train=True)


def _run_probe(ctx: EvalContext) -> list[EvalResult]:
    results = []
    for name in probe_datasets(ctx.paths, ctx.probe):
        data = _probe_set(ctx, name)
        results.append(linear_probe(ctx.trained, data, ctx.infer, ctx.probe, ctx.test_features(data)))
    return results


SUITES: dict[str, Suite] = {
    "demo": Suite(_check_demo, _run_demo),
    "cifar10": Suite(_check_cifar("cifar10"), _run_cifar("cifar10")),
    "cifar100": Suite(_check_cifar("cifar100"), _run_cifar("cifar100")),
    "imagenet": Suite(_check_imagenet, _run_imagenet),
    "imagefolder": Suite(_check_imagefolder, _run_imagefolder),
    "retrieval": Suite(_check_retrieval, _run_retrieval),
    "linear_probe": Suite(_check_probe, _run_probe),
    "datacomp": _datacomp_suite("datacomp"),
    "imagenet_shifts": _datacomp_suite("imagenet_shifts"),
    "vtab": _datacomp_suite("vtab"),
    "sugarcrepe": Suite(_check_sugarcrepe, lambda ctx: [compositionality.evaluate_sugarcrepe(
        ctx.trained, ctx.paths.sugarcrepe, ctx.paths.sugarcrepe_images, ctx.infer)]),
    "winoground": Suite(_check_winoground, lambda ctx: [compositionality.evaluate_winoground(
        ctx.trained, ctx.paths.winoground, ctx.infer)]),
}


def parse_suites(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SUITES]
    if unknown or not names:
        raise UserError(f"unknown suite(s) {unknown or text!r}; choose from {', '.join(SUITES)}")
    return list(dict.fromkeys(names))  # de-duplicated, order kept


def check_suites(names: list[str], paths: DataPaths, probe: LinearProbeConfig) -> None:
    for name in names:
        SUITES[name].check(paths, probe)
