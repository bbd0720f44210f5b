"""`bench/gpu_check.sh --dry-run`: every step of the prepared GPU check runs once on the CPU
(tiny, numbers meaningless), so the script is ready the day a GPU is lent."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from trainer_cli import REPO_ROOT, subprocess_env

sys.path.insert(0, str(REPO_ROOT))  # bench/ is not installed


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_check_dry_run_runs_every_step(demo_shards, tmp_path):
    from bench.corpus import clip_bpe_path
    from training.text.tokenizer import Tokenizer

    corpus = tmp_path / "corpus"
    shutil.copytree(demo_shards, corpus)
    Tokenizer.from_clip_bpe(clip_bpe_path()).save(corpus / "tokenizer.json")
    out = tmp_path / "results"
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run", "--corpus", str(corpus),
         "--work", str(tmp_path / "work"), "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=880, env=subprocess_env())
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    results = json.loads(out.with_suffix(".json").read_text())
    assert results["dry_run"] is True
    expected = {"matmul_peak", "ours_vit_b32", "ours_vit_b16", "open_clip_train_vit_b16",
                "ours_vit_b16_compiled", "ours_vit_b16_math_attention",
                "loader_cpu_side_of_gpu_augment", "ours_vit_b16_deepspeed_zero2",
                "eval_images_per_s"}
    assert set(results["steps"]) == expected
    statuses = {name: row["status"] for name, row in results["steps"].items()}
    assert statuses.pop("ours_vit_b16_compiled") == "skipped"  # minutes of inductor on a CPU
    assert set(statuses.values()) == {"ok"}, results["steps"]
    assert results["steps"]["ours_vit_b16"]["samples_per_s"] > 0
    assert results["steps"]["loader_cpu_side_of_gpu_augment"]["augment_samples_per_s"] > 0
    table = out.with_suffix(".md").read_text()
    assert "dry run" in table and table.count("| ok |") == len(expected) - 1


def test_gpu_check_without_a_gpu_says_so_in_one_line():
    done = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120, env=subprocess_env())
    assert done.returncode == 2
    assert done.stdout.strip().splitlines() == [
        "gpu_check: no GPU here (torch.cuda.is_available() is False); use --dry-run to check "
        "the steps on the CPU"]
