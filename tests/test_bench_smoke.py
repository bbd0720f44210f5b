"""The bench's FLOP counter (bench/flops.py, the numerator of MFU) against hand counts for the
`tiny` model. Reference maths only: no timing here (speed lives in `make bench`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not installed

from bench.flops import (  # noqa: E402
    counted_text_train_flops, image_train_flops, mfu, text_forward_flops, text_train_flops,
    train_flops_per_sample,
)
from training.model import build_model  # noqa: E402
from training.model.configs import MODEL_CONFIGS, TextConfig  # noqa: E402
from training.model.text_tower import TextTower  # noqa: E402


def test_text_formula_matches_a_hand_count_and_torch_flop_counter():
    cfg = TextConfig(vocab_size=16, width=8, layers=2, heads=2, eot_id=15, pad_id=0)
    # One block on 5 tokens, width 8, MLP 32 (2 FLOPs per multiply-add):
    #   qkv + out: 2*5*8*(24+8) = 2560; MLP: 2*5*8*32*2 = 5120; scores + weighted sum: 4*5*5*8 = 800
    # Two blocks, then the EOT row through the 8 -> 4 projection: 2*8*4 = 64.
    hand_forward = 2 * (2560 + 5120 + 800) + 64
    assert text_forward_flops(cfg, embed_dim=4, length=5) == hand_forward == 17024
    assert text_train_flops(cfg, 4, [5, 5]) == 3 * hand_forward  # backward = 2x forward

    torch.manual_seed(0)
    tower = TextTower(cfg, embed_dim=4)
    tokens = torch.randint(1, 15, (3, 5))
    tokens[:, -1] = cfg.eot_id
    assert counted_text_train_flops(tower, tokens) == 3 * hand_forward


def test_image_count_of_the_tiny_vit_matches_a_hand_count():
    cfg = MODEL_CONFIGS["tiny"]()  # 64 px, 8-px patches, 4 blocks x 128 wide, MLP 512, embed 128
    model = build_model(cfg)
    patch_embed = 2 * 64 * (3 * 8 * 8) * 128 * 2  # 64 patches; backward: weights only (no input grad)
    block = 2 * 65 * 128 * 512 + 2 * 65 * 128 * 512 * 2 + 4 * 65 * 65 * 128  # 64 patches + CLS
    projection = 2 * 128 * 128
    hand = patch_embed + 3 * (4 * block + projection)
    assert image_train_flops(model, 64) == hand == 339_056_640

    parts = train_flops_per_sample(model, cfg, [7, 9], batch_size=16)
    assert parts["loss"] == 3 * 2 * 16 * 128
    assert parts["total"] == pytest.approx(parts["image"] + parts["text"] + parts["loss"])


def test_mfu_is_model_flops_per_second_over_the_peak():
    assert mfu(samples_per_s=20.0, flops_per_sample=8e9, peak_flops_per_s=800e9) == pytest.approx(0.2)
