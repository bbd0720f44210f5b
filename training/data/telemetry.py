"""Loader telemetry: how fast each worker makes samples, where its time goes, how full the queue
is. The trainer logs it into metrics.jsonl next to `data_wait_frac`, so a user sees that a run
is data-bound, and which stage binds it, before they see only that it is slow.

Workers time their stages per batch (`training.data.decode.StageTimes`, plus the batch's whole
busy time, which excludes time blocked on the queue); the loader adds them up here per logging
window, together with the number of batches already waiting each time the trainer asked, and
the remote reads retried and shards given up (`data_pipeline.object_store`), once there are any.
"""

from __future__ import annotations

from dataclasses import dataclass, field

STAGES = ("read", "decode", "augment", "tokenize")


@dataclass
class LoaderTelemetry:
    samples: int = 0
    busy_s: float = 0.0  # worker seconds spent making those samples
    stage_s: list[float] = field(default_factory=lambda: [0.0] * len(STAGES))
    depth_sum: int = 0
    depth_readings: int = 0
    read_retries: int = 0  # remote reads retried (data_pipeline.object_store)
    shards_given_up: int = 0  # remote shards whose rest was skipped after every retry failed

    def add_batch(self, samples: int, times: list[float]) -> None:
        """times: the worker's seconds per stage (STAGES order), then its busy seconds."""
        self.samples += samples
        for index, seconds in enumerate(times[:len(STAGES)]):
            self.stage_s[index] += seconds
        self.busy_s += times[len(STAGES)]

    def add_storage(self, retries: int, gave_up: int) -> None:
        self.read_retries += retries
        self.shards_given_up += gave_up

    def add_depth(self, ready_batches: int | None) -> None:
        if ready_batches is not None:
            self.depth_sum += ready_batches
            self.depth_readings += 1

    def record(self) -> dict[str, float]:
        """The metrics of this window (empty before the first batch)."""
        if not self.samples or self.busy_s <= 0:
            return {}
        out = {"data_worker_samples_per_s": self.samples / self.busy_s}
        for name, seconds in zip(STAGES, self.stage_s):
            out[f"data_{name}_frac"] = seconds / self.busy_s
        if self.depth_readings:
            out["data_queue_depth"] = self.depth_sum / self.depth_readings
        # Counts in the window, only once storage has misbehaved (local shards never do).
        if self.read_retries or self.shards_given_up:
            out["data_read_retries"] = self.read_retries
            out["data_shards_given_up"] = self.shards_given_up
        return out


# A window in which the trainer waited for data longer than this share of its time is data-bound.
DATA_BOUND_FRAC = 0.10


def data_bound_message(metrics: dict[str, float], workers: int) -> str | None:
    """One line saying the run is data-bound and what binds it, or None if it is not."""
    wait = metrics.get("data_wait_frac", 0.0)
    if wait <= DATA_BOUND_FRAC or "data_worker_samples_per_s" not in metrics:
        return None
    stages = sorted(((metrics[f"data_{s}_frac"], s) for s in STAGES), reverse=True)
    shares = ", ".join(f"{name} {100 * frac:.0f}%" for frac, name in stages)
    hint = "raise data.workers"
    if stages[0][1] == "augment":
        hint += " or, on a GPU, set data.augment_on=device"
    return (f"data-bound: steps waited for data {100 * wait:.0f}% of the time; each of "
            f"{max(workers, 1)} worker(s) makes {metrics['data_worker_samples_per_s']:.0f} "
            f"samples/s ({shares} of its time): {hint}")
