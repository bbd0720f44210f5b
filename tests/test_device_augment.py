"""The batched augmentation of `data.augment_on=device`, run on the CPU device: same draws as the
worker path, pixels equal within interpolation tolerance, and the loader telemetry."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.demo_corpus import DemoConfig, plan_split
from data_pipeline.shape_rendering import render_scene
from training.data import build_train_loader
from training.data.config import AugmentConfig
from training.data.device_augment import (
    ERASE_H, FLIP, MIX, PARAMS, DrawCrop, augment_on_device, collate_crops,
)
from training.data.telemetry import data_bound_message
from training.data.transforms import build_train_transform, normalize_images
from training.train import batch_to_device

from test_data import PAD_ID, config, tokenize, write_source

CPU = torch.device("cpu")
LEVEL = 1 / (255 * 0.2686)  # one grey level in normalised units (the smallest CLIP std)


@pytest.fixture(scope="module")
def scenes() -> list[Image.Image]:
    """Demo-corpus scenes (hard shape edges, flat colours: the worst case for a resize filter),
    at a few sizes so crops in one batch differ in size."""
    rows = [r for r in plan_split(DemoConfig(num_samples=400), "train") if not r.fault][:24]
    return [render_scene(r, (256, 200, 160)[i % 3]) for i, r in enumerate(rows)]


def _both_paths(images, cfg: AugmentConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(worker path, device path, drawn params), each sample under the same seed."""
    worker, crops = [], []
    for seed, image in enumerate(images):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            worker.append(build_train_transform(cfg)(image))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            crops.append(DrawCrop(cfg)(image))
    pixels, params = collate_crops(crops)
    return (normalize_images(torch.stack(worker), CPU),
            augment_on_device(pixels, params, cfg.image_size, CPU), params)


@pytest.mark.parametrize("cfg", [
    AugmentConfig(224, (0.9, 1.0)),  # OpenCLIP's default: mild crops, upsampling the small ones
    AugmentConfig(64, (0.08, 1.0), hflip=0.5, color_jitter=0.4, random_erasing=0.5),  # > 2x shrink
    AugmentConfig(96, (0.3, 1.0), hflip=0.5, color_jitter=0.4, random_erasing=0.5, color_mix=0.1),
], ids=["openclip_default", "shrink", "everything_on"])
def test_device_path_equals_the_worker_path_within_interpolation(scenes, cfg):
    worker, device, params = _both_paths(scenes, cfg)
    assert device.shape == worker.shape == (len(scenes), 3, cfg.image_size, cfg.image_size)
    if cfg.hflip:  # the cases below really exercise flips and erasing
        assert 0 < params[:, FLIP].sum() < len(scenes) and (params[:, ERASE_H] > 0).any()
    assert bool(params[:, MIX].any()) == (cfg.color_mix > 0)
    diff = (device - worker).abs() / LEVEL
    # Measured: mean 0.15-0.95 levels, 99th percentile 1.7-3.7 (bilinear-area vs bicubic at the
    # shapes' edges, and uint8 rounding between the worker path's jitter steps). A flip, crop
    # box, jitter factor, colour mix or erased rectangle that differed would move whole regions by tens.
    assert diff.mean() < 1.5, diff.mean()
    assert diff.flatten().quantile(0.99) < 6, diff.flatten().quantile(0.99)
    per_image = diff.mean(dim=(1, 2, 3))
    assert per_image.max() < 4, per_image


def test_a_crop_gives_the_same_pixels_alone_or_padded_in_a_batch(scenes):
    cfg = AugmentConfig(48, (0.3, 1.0), hflip=0.5)
    crops = [DrawCrop(cfg)(image) for image in scenes[:6]]
    assert len({c.pixels.shape for c in crops}) > 1  # padding is really needed
    pixels, params = collate_crops(crops)
    batched = augment_on_device(pixels, params, cfg.image_size, CPU)
    for index, crop in enumerate(crops):
        alone, alone_params = collate_crops([crop])
        torch.testing.assert_close(
            batched[index], augment_on_device(alone, alone_params, cfg.image_size, CPU)[0])
    assert params.shape == (6, PARAMS)


def test_a_flat_crop_stays_flat_up_to_its_edges():
    # The far edge's taps read the padding: it must repeat the edge, not be black.
    image = Image.fromarray(np.full((50, 70, 3), 200, dtype=np.uint8))
    big = Image.fromarray(np.full((90, 90, 3), 10, dtype=np.uint8))
    cfg = AugmentConfig(32, (0.5, 1.0))
    pixels, params = collate_crops([DrawCrop(cfg)(image), DrawCrop(cfg)(big)])
    out = augment_on_device(pixels, params, 32, CPU)
    torch.testing.assert_close(out[0], normalize_images(torch.full((1, 3, 32, 32), 200, dtype=torch.uint8), CPU)[0])


def test_loader_ships_crops_and_the_trainer_finishes_them(tmp_path):
    source = write_source(tmp_path / "s", shards=2, per_shard=8, prefix="s")
    common = dict(workers=1, batch_size=4, image_size=16, scale=(0.4, 1.0), hflip=0.5,
                  color_jitter=0.3, sample_shuffle_buffer=6, seed=5)
    on_workers = build_train_loader(config(source, **common), tokenize, PAD_ID)
    on_device = build_train_loader(config(source, augment_on="device", **common), tokenize, PAD_ID)
    for _ in range(3):
        a, b = next(on_workers), next(on_device)
        assert a["keys"] == b["keys"] and torch.equal(a["text"], b["text"])
        assert b["image"].dtype == torch.uint8 and b["augment_size"] == 16
        finished = batch_to_device(b, CPU)["image"]
        expected = batch_to_device(a, CPU)["image"]
        assert finished.shape == expected.shape
        # Random-noise JPEGs (test_data's) are the worst case for interpolation differences.
        assert ((finished - expected).abs() / LEVEL).mean() < 12
    # Where the augmentation runs is not part of the stream: a run resumes across the switch.
    state = on_device.state_dict()
    on_device.close()
    resumed = build_train_loader(config(source, **common), tokenize, PAD_ID, states=[state])
    assert next(resumed)["keys"] == next(on_workers)["keys"]
    for loader in (on_workers, resumed):
        loader.close()


def test_loader_telemetry_accounts_for_the_workers_time(tmp_path):
    source = write_source(tmp_path / "s", shards=2, per_shard=16, prefix="s")
    loader = build_train_loader(config(source, workers=1, batch_size=4), tokenize, PAD_ID)
    assert loader.telemetry() == {}  # nothing before the first batch
    for _ in range(6):
        next(loader)
    metrics = loader.telemetry()
    loader.close()
    stages = [metrics[f"data_{s}_frac"] for s in ("read", "decode", "augment", "tokenize")]
    assert all(share > 0 for share in stages) and sum(stages) <= 1.0
    assert metrics["data_worker_samples_per_s"] > 0 and metrics["data_queue_depth"] >= 0
    assert loader.telemetry() == {}  # each window starts anew


def test_data_bound_message_names_the_binding_stage():
    metrics = {"data_wait_frac": 0.4, "data_worker_samples_per_s": 480.0, "data_read_frac": 0.05,
               "data_decode_frac": 0.3, "data_augment_frac": 0.55, "data_tokenize_frac": 0.02}
    line = data_bound_message(metrics, workers=2)
    assert line == ("data-bound: steps waited for data 40% of the time; each of 2 worker(s) makes "
                    "480 samples/s (augment 55%, decode 30%, read 5%, tokenize 2% of its time): "
                    "raise data.workers or, on a GPU, set data.augment_on=device")
    assert data_bound_message({**metrics, "data_wait_frac": 0.05}, workers=2) is None
    decode_bound = data_bound_message({**metrics, "data_decode_frac": 0.9}, workers=1)
    assert decode_bound.endswith(": raise data.workers")
