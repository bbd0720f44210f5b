"""The watch loop, done records, lock and W&B logging, with stand-ins for checkpoints and models
(the real-checkpoint version is in test_eval_jobs.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from data_pipeline.errors import UserError
from eval.plots import plot_metrics
from eval.results import (
    EvalResult, format_summary, mark_done, read_results, suites_done, write_result,
)
from eval.wandb_log import WandbSink, wandb_payload
from eval.watch import FINISHED_MARKER, WatchConfig, WatchLock, watch


def _touch_checkpoint(run_dir, step):
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:08d}.pt"
    path.write_bytes(b"")
    return path


class _Recorder:
    """evaluate/pending stand-ins that keep the done records the way CheckpointEvaluator does."""

    def __init__(self, out_dir, suites):
        self.out_dir, self.suites, self.calls = out_dir, suites, []

    def pending(self, checkpoint):
        return [s for s in self.suites if s not in suites_done(self.out_dir, checkpoint)]

    def __call__(self, checkpoint):
        self.calls.append(checkpoint.name)
        mark_done(self.out_dir, checkpoint, int(checkpoint.stem[5:]), self.pending(checkpoint))


def test_watch_evaluates_each_checkpoint_once_until_finished(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "run" / "eval"
    _touch_checkpoint(run_dir, 10)
    recorder = _Recorder(out, ["demo"])
    naps = []

    def sleep(seconds):  # the trainer makes progress while the watcher sleeps
        naps.append(seconds)
        if len(naps) == 1:
            _touch_checkpoint(run_dir, 20)
        elif len(naps) == 2:
            _touch_checkpoint(run_dir, 30)
            (run_dir / FINISHED_MARKER).write_text("{}")

    n = watch(WatchConfig(run_dir, poll_seconds=5), recorder.pending, recorder, sleep)
    assert recorder.calls == ["step_00000010.pt", "step_00000020.pt", "step_00000030.pt"]
    assert n == 3 and naps == [5, 5]
    # Run again (a restarted watcher): nothing is evaluated twice.
    assert watch(WatchConfig(run_dir), recorder.pending, recorder, sleep) == 0
    # A new suite on the same run: only that suite is pending, for every checkpoint.
    wider = _Recorder(out, ["demo", "cifar10"])
    assert watch(WatchConfig(run_dir), wider.pending, wider, sleep) == 3
    assert suites_done(out, run_dir / "checkpoints" / "step_00000020.pt") == {"demo", "cifar10"}


def test_watch_stops_after_max_wait_and_survives_rotated_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    _touch_checkpoint(run_dir, 1)
    seen = []

    def evaluate(checkpoint):
        seen.append(checkpoint.name)
        raise FileNotFoundError(checkpoint)  # deleted by keep_checkpoints before loading

    n = watch(WatchConfig(run_dir, poll_seconds=1, max_wait=0), lambda c: ["demo"], evaluate,
              sleep=lambda s: pytest.fail("max_wait=0 must not sleep"))
    assert n == 0 and seen == ["step_00000001.pt"]


def test_a_marker_older_than_the_newest_checkpoint_is_not_the_end(tmp_path):
    # finished.json left by an earlier end; the run was resumed and wrote step 20 since.
    run_dir = tmp_path / "run"
    _touch_checkpoint(run_dir, 10)
    _touch_checkpoint(run_dir, 20)
    (run_dir / FINISHED_MARKER).write_text('{"step": 10, "time": 0}')
    recorder = _Recorder(tmp_path / "out", ["demo"])
    naps = []

    def sleep(seconds):
        naps.append(seconds)
        (run_dir / FINISHED_MARKER).write_text('{"step": 20, "time": 1}')  # the resumed run ends

    assert watch(WatchConfig(run_dir, poll_seconds=2), recorder.pending, recorder, sleep) == 2
    assert naps == [2]


def test_watch_config_and_lock_errors(tmp_path):
    with pytest.raises(UserError, match="no such run folder"):
        WatchConfig(tmp_path / "missing")
    with WatchLock(tmp_path):
        assert (tmp_path / "watch.lock").read_text() == str(os.getpid())
        with pytest.raises(UserError, match="another watcher"):
            WatchLock(tmp_path).__enter__()
    assert not (tmp_path / "watch.lock").exists()
    # A lock left by a dead process is taken over.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / "watch.lock").write_text(dead)
    with WatchLock(tmp_path):
        pass


def _results():
    return [
        EvalResult("cifar10", "zeroshot_classification", {"acc1": 0.5, "acc5": 0.9}, {"acc1": 0.1}),
        EvalResult("demo_val", "zeroshot_retrieval", {"image_retrieval_recall@1": 0.25}),
    ]


def test_result_files_table_and_plot(tmp_path):
    for step in (100, 200):
        checkpoint = tmp_path / "checkpoints" / f"step_{step:08d}.pt"
        for result in _results():
            write_result(tmp_path / "eval", checkpoint, step, result)
    files = sorted(p.relative_to(tmp_path / "eval").as_posix() for p in (tmp_path / "eval").rglob("*.json"))
    assert files == [
        "step_00000100/cifar10.zeroshot_classification.json",
        "step_00000100/demo_val.zeroshot_retrieval.json",
        "step_00000200/cifar10.zeroshot_classification.json",
        "step_00000200/demo_val.zeroshot_retrieval.json",
    ]
    data = json.loads((tmp_path / "eval" / files[0]).read_text())
    assert data["step"] == 100 and data["metrics"]["acc1"] == 0.5 and data["chance"]["acc1"] == 0.1
    assert len(read_results(tmp_path / "eval")) == 4
    table = format_summary(_results(), "step 200")
    assert "cifar10" in table and " 50.00%" in table and " 10.00%" in table
    png = plot_metrics(read_results(tmp_path / "eval"), tmp_path / "eval" / "metrics.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _FakeRun:
    def __init__(self):
        self.defined, self.logged, self.finished = [], [], False

    def define_metric(self, name, step_metric=None):
        self.defined.append((name, step_metric))

    def log(self, payload, step=None):
        assert step is None, "eval must not move the run's own step (the trainer is ahead)"
        self.logged.append(payload)

    def finish(self):
        self.finished = True


def test_wandb_logs_eval_metrics_against_checkpoint_step(tmp_path):
    run = _FakeRun()
    sink = WandbSink("offline", tmp_path, run=run)
    sink.log(tmp_path / "step_00000200.pt", 200, _results())
    sink.close()
    assert run.logged == [{"eval/step": 200, "eval/cifar10/acc1": 0.5, "eval/cifar10/acc5": 0.9,
                           "eval/demo_val/image_retrieval_recall@1": 0.25}]
    assert ("eval/*", "eval/step") in run.defined and run.finished
    assert wandb_payload(5, [])["eval/step"] == 5
