"""Precision chosen from the hardware: the choice logic on simulated machines, and one real run."""

from __future__ import annotations

import time

import pytest
import torch

from training.parallel.precision import (
    Precision, choose_precision, cpu_flags, cpu_has_native_bf16, cpu_model_name,
)
from training.run_config import load_run_config
from training.config_loading import ConfigError

ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx avx2 fma bmi2
"""
SAPPHIRE_RAPIDS = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C
flags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile
"""
ICE_LAKE = "model name : Intel Xeon 8375C\nflags : avx2 avx512f avx512bw avx512_vnni\n"
GRAVITON3 = "processor : 0\nFeatures : fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize("cpuinfo, native", [
    (ZEN3, False), (SAPPHIRE_RAPIDS, True), (ICE_LAKE, False), (GRAVITON3, True), ("", False),
])
def test_native_bf16_is_read_from_the_cpu_flags(cpuinfo, native):
    assert cpu_has_native_bf16(cpu_flags(cpuinfo)) is native


def test_cpu_model_name():
    assert cpu_model_name(ZEN3) == "AMD EPYC 7B13"


@pytest.mark.parametrize("device, cuda_bf16, cpu_bf16, expected", [
    ("cuda", True, None, "bf16"),   # Ampere or later
    ("cuda", False, None, "fp16"),  # V100, T4: fp16 with a gradient scaler
    ("cpu", None, True, "bf16"),    # AVX512-BF16 / AMX
    ("cpu", None, False, "fp32"),   # AVX2 only: bf16 would be emulated
])
def test_auto_choice(device, cuda_bf16, cpu_bf16, expected):
    choice = choose_precision("auto", device, cuda_bf16=cuda_bf16, cpu_native_bf16=cpu_bf16)
    assert choice.name == expected and choice.requested == "auto"
    assert choice.reason.startswith("auto:") and choice.warning is None


def test_explicit_choice_is_kept_and_emulated_bf16_warns_in_one_line():
    slow = choose_precision("bf16", "cpu", cpu_native_bf16=False)
    assert slow.name == "bf16" and slow.warning is not None
    assert "\n" not in slow.warning and "emulates" in slow.warning and "fp32" in slow.warning
    assert choose_precision("bf16", "cpu", cpu_native_bf16=True).warning is None
    assert choose_precision("fp32", "cpu", cpu_native_bf16=False).warning is None
    assert choose_precision("fp16", "cuda", cuda_bf16=True).name == "fp16"
    with pytest.raises(ValueError, match="auto, bf16, fp16 or fp32"):
        choose_precision("fp8", "cpu")


def test_precision_helper_refuses_unresolved_auto():
    with pytest.raises(ValueError, match="choose_precision"):
        Precision("auto", "cpu")
    assert Precision("fp16", "cpu").scaler.is_enabled()
    assert not Precision("bf16", "cpu").scaler.is_enabled()


def test_run_config_defaults_to_auto_and_moved_keys_say_where():
    cfg = load_run_config(None, ["data.train_shards=x"])
    assert cfg.engine.precision == "auto"
    with pytest.raises(ConfigError, match=r"train\.precision is now engine\.precision"):
        load_run_config(None, ["data.train_shards=x", "train.precision=fp32"])


def test_what_auto_picks_here_is_not_slower_than_fp32():
    """On this machine: auto never picks a precision whose matmul is far slower than fp32's (what
    an emulated bf16 is). A coarse, order-of-magnitude check, not a benchmark."""
    choice = choose_precision("auto", "cpu")
    if choice.name == "fp32":
        return
    a = torch.randn(256, 256)

    def rate(dtype):
        x = a.to(dtype)
        x @ x
        started, n = time.perf_counter(), 0
        while time.perf_counter() - started < 0.2:
            x @ x
            n += 1
        return n / (time.perf_counter() - started)

    assert rate(torch.bfloat16) > rate(torch.float32) / 10, choice
