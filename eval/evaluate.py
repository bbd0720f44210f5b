"""One checkpoint through the chosen suites: load, evaluate, write results, record, plot, log.

Suites already recorded as done for a checkpoint (OUT/done.json) are skipped unless `force`,
so a restarted watcher or a second `eval.run` never scores the same thing twice; each suite is
recorded as soon as its results are written, so a crash loses at most the suite it was in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from eval.config import DataPaths, InferenceConfig, LinearProbeConfig
from eval.plots import METRICS_PNG, plot_metrics
from eval.results import (
    EvalResult, format_summary, mark_done, read_results, suites_done, write_result,
)
from eval.sharding import agree, barrier, is_main
from eval.suites import SUITES, EvalContext
from eval.wandb_log import WandbSink
from training.model.trained import TrainedModel, load_trained_model


def default_out_dir(checkpoint: Path) -> Path:
    """RUN_DIR/eval for RUN_DIR/checkpoints/step_X.pt, else eval/ beside the checkpoint."""
    parent = checkpoint.resolve().parent
    return (parent.parent if parent.name == "checkpoints" else parent) / "eval"


@dataclass
class CheckpointEvaluator:
    suites: list[str]
    infer: InferenceConfig
    paths: DataPaths
    probe: LinearProbeConfig
    out_dir: Path
    force: bool = False
    plot: bool = True
    wandb: WandbSink | None = None
    # checkpoint path, device= -> model; an imported OpenAI/OpenCLIP file needs another loader.
    load: Callable[..., TrainedModel] = load_trained_model

    def pending(self, checkpoint: Path) -> list[str]:
        if self.force:
            return list(self.suites)
        done = suites_done(self.out_dir, checkpoint)
        return [s for s in self.suites if s not in done]

    def __call__(self, checkpoint: Path) -> list[EvalResult]:
        todo = agree(self.pending(checkpoint))  # sharded: rank 0's view of done.json
        if not todo:
            print(f"{checkpoint.name}: already evaluated ({', '.join(self.suites)}); skipped",
                  flush=True)
            return []
        started = time.perf_counter()
        trained = self.load(checkpoint, device=self.infer.device)
        ctx = EvalContext(trained, self.infer, self.paths, self.probe)
        results: list[EvalResult] = []
        main = is_main()  # sharded (torchrun): every rank evaluates, rank 0 alone records
        for suite in todo:
            suite_results = SUITES[suite].run(ctx)
            if main:
                for result in suite_results:
                    write_result(self.out_dir, checkpoint, trained.step, result)
                mark_done(self.out_dir, checkpoint, trained.step, [suite])
            barrier()  # no rank reads done.json before rank 0 has written it
            results += suite_results
        if not main:
            return results
        title = (f"step {trained.step}  {checkpoint}  ({', '.join(todo)}; "
                 f"{time.perf_counter() - started:.1f} s)")
        print(format_summary(results, title), flush=True)
        if self.plot:
            png = plot_metrics(read_results(self.out_dir), self.out_dir / METRICS_PNG)
            if png is not None:
                print(f"results: {self.out_dir}  plot: {png}", flush=True)
        if self.wandb is not None:
            self.wandb.log(checkpoint, trained.step, results)
        return results
