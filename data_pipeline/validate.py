"""Check shard folders before training reads them (`make validate`).

    python -m data_pipeline.validate DIR      (a folder, or a URL such as s3://bucket/shards)

Opens every N.tar in DIR and checks that the tar is whole (not truncated), that every sample has
an image that decodes and a non-empty UTF-8 caption (.txt) -- the trainer's own test of a usable
sample, from data_pipeline.shard_format -- that each .json parses, and that
sizes.json lists every tar with its true sample count. If DIR is a demo corpus (it holds train/,
val/, heldout/), each of those folders is checked. Problems are printed with their shard and
sample key, those with a whole shard or sizes.json first; past 50 per folder a count per kind
stands in for the rest (--all prints every one). Exit status: 0 all good, 1 problems found, 2 DIR
is not a shard folder.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence, TextIO

import fsspec

from data_pipeline.demo_corpus import SPLITS
from data_pipeline.errors import UserError, run_main
from data_pipeline.shard_files import SIZES_FILE, finished_shard_ids, shard_tars
from data_pipeline.shard_format import read_shard, sample_problems

MAX_PRINTED_PROBLEMS = 50  # per folder; a broken writer can produce one problem per sample


@dataclass(frozen=True)
class Problem:
    shard: str
    key: str | None  # None: the shard (or sizes.json) itself, not one sample
    message: str

    def __str__(self) -> str:
        where = f"{self.shard} {self.key}" if self.key else self.shard
        return f"{where}: {self.message}"

    @property
    def kind(self) -> str:
        """The message without its particulars, for the per-kind summary."""
        text = re.sub(r"^\w+: ", "", self.message) if self.key else self.message
        text = text.split(" (")[0]
        return re.sub(r"\d+", "N", text)


@dataclass
class FolderReport:
    folder: str
    shards: int = 0
    samples: int = 0
    problems: list[Problem] = field(default_factory=list)


def validate_folder(folder: str) -> FolderReport:
    """Check one shard folder; problems are collected, never raised."""
    fs, path = fsspec.core.url_to_fs(folder)
    report = FolderReport(folder)
    tars = shard_tars(folder)
    finished = finished_shard_ids(folder)
    counts: dict[str, int] = {}
    for name in tars:
        report.shards += 1
        samples = 0
        for raw in read_shard(f"{folder.rstrip('/')}/{name}"):
            if not raw["__key__"]:  # the tar itself is broken, truncated or empty
                report.problems.append(Problem(name, None, raw["__error__"]))
                continue
            samples += 1
            report.problems.extend(Problem(name, raw["__key__"], m) for m in sample_problems(raw))
        if finished and int(name.split(".")[0]) not in finished:
            report.problems.append(
                Problem(
                    name,
                    None,
                    "img2dataset did not finish this shard (no _stats.json); rerun with --incremental",
                )
            )
        counts[name] = samples
        report.samples += samples
    report.problems.extend(_sizes_problems(fs, path, counts))
    return report


def _sizes_problems(fs: fsspec.AbstractFileSystem, path: str, counts: dict[str, int]) -> list[Problem]:
    sizes_path = f"{path}/{SIZES_FILE}"
    if not fs.exists(sizes_path):
        return [Problem(SIZES_FILE, None, "missing: loaders cannot tell the dataset size")]
    try:
        with fs.open(sizes_path, "r") as handle:
            sizes = json.load(handle)
    except ValueError as exc:
        return [Problem(SIZES_FILE, None, f"unreadable ({exc})")]
    problems = []
    for name, count in counts.items():
        if name not in sizes:
            problems.append(Problem(name, None, f"not listed in {SIZES_FILE} (holds {count} samples)"))
        elif sizes[name] != count:
            problems.append(
                Problem(name, None, f"{SIZES_FILE} says {sizes[name]} samples, the tar holds {count}")
            )
    problems.extend(
        Problem(name, None, f"listed in {SIZES_FILE} but missing") for name in sizes if name not in counts
    )
    return problems


def folders_to_check(root: str) -> list[str]:
    """The shard folders under `root`: its demo split folders if it has them, else root itself."""
    fs, path = fsspec.core.url_to_fs(root)
    if not fs.isdir(path):
        raise UserError(f"no shard folder at {root}")
    splits = [f"{root.rstrip('/')}/{s}" for s in SPLITS if fs.isdir(f"{path}/{s}")]
    folders = splits or [root]
    for folder in folders:
        if not shard_tars(folder):
            raise UserError(
                f"{folder} holds no shard (*.tar); build one with `python -m data_pipeline.shards`"
            )
    return folders


def print_report(report: FolderReport, out: TextIO, show_all: bool = False) -> None:
    """Shard-level problems first (a truncated tar, a sizes.json that disagrees: the ones that
    matter most), then samples; beyond MAX_PRINTED_PROBLEMS lines a count per kind stands in
    for the rest unless `show_all`."""
    ordered = sorted(report.problems, key=lambda p: p.key is not None)  # stable: shard order kept
    shown = ordered if show_all else ordered[:MAX_PRINTED_PROBLEMS]
    for problem in shown:
        print(f"  {problem}", file=out)
    hidden = len(ordered) - len(shown)
    if hidden > 0:
        print(f"  ... and {hidden} more problems (--all prints every one); by kind:", file=out)
        kinds = Counter(p.kind for p in ordered)
        for kind, count in kinds.most_common():
            print(f"    {count:6d} x {kind}", file=out)
    verdict = "OK" if not report.problems else f"{len(report.problems)} PROBLEMS"
    print(f"{report.folder}: {report.shards} shards, {report.samples} samples: {verdict}", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.validate",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dir", help="shard folder (or a URL: s3://bucket/shards), or a demo corpus "
                                    "root holding train/ val/ heldout/")
    parser.add_argument("--all", action="store_true",
                        help=f"print every problem (default: the first {MAX_PRINTED_PROBLEMS} per "
                             "folder, shard-level ones first, then a count per kind)")
    args = parser.parse_args(argv)
    reports = [validate_folder(folder) for folder in folders_to_check(args.dir)]
    for report in reports:
        print_report(report, sys.stdout, show_all=args.all)
    broken = sum(len(r.problems) for r in reports)
    if broken:
        print(f"validation failed: {broken} problems in {args.dir}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_main(main)
