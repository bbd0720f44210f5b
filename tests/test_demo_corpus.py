"""The offline demo corpus: its plan, its pixels, its captions, and the shards the real pipeline
builds from it (held-out pairs stay out of training, planted failures are counted)."""

from __future__ import annotations

import json
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from data_pipeline.captions import PLURALS
from data_pipeline.demo_corpus import (
    ALL_COMBOS,
    ATTRIBUTE_COLUMNS,
    COLOURS,
    HELD_OUT,
    SHAPES,
    TRAIN_COMBOS,
    DemoConfig,
    fault_counts,
    plan_split,
)
from data_pipeline.loopback_server import serve_folder
from data_pipeline.shape_rendering import render_scene


def _tar_metadata(folder: Path) -> list[dict]:
    found = []
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            found += [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    return found


def test_held_out_pairs_are_a_fifth_and_leave_every_word_in_training():
    assert 0.15 <= len(HELD_OUT) / len(ALL_COMBOS) <= 0.20
    assert {c for c, _ in TRAIN_COMBOS} == set(COLOURS)
    assert {s for _, s in TRAIN_COMBOS} == set(SHAPES)


def test_plan_is_deterministic_in_the_seed():
    config = DemoConfig(num_samples=200, seed=3)
    assert plan_split(config, "train") == plan_split(DemoConfig(num_samples=200, seed=3), "train")
    assert plan_split(config, "train") != plan_split(DemoConfig(num_samples=200, seed=4), "train")


@pytest.mark.parametrize("split", ["train", "val", "heldout"])
def test_plan_balances_classes_and_plants_failures(split):
    config = DemoConfig(num_samples=400)
    rows = plan_split(config, split)
    good = [r for r in rows if not r.fault]
    assert len(good) == config.split_size(split)
    pairs = [(r.colour, r.shape) for r in good]
    assert all((p in HELD_OUT) == (split == "heldout") for p in pairs)
    counts = {p: pairs.count(p) for p in set(pairs)}
    assert max(counts.values()) - min(counts.values()) <= 1  # classes cycle, so they stay balanced
    planted = {kind: sum(r.fault == kind for r in rows) for kind in fault_counts(len(good))}
    assert planted == fault_counts(len(good))
    assert all(r.background != r.colour for r in rows)  # a shape never vanishes into its backdrop


def test_every_caption_names_colour_and_shape():
    for row in plan_split(DemoConfig(num_samples=500), "train"):
        noun = row.shape if row.count == 1 else PLURALS.get(row.shape, row.shape + "s")
        assert row.colour in row.caption and noun in row.caption, row
    captions = {r.caption for r in plan_split(DemoConfig(num_samples=500), "train")}
    assert len(captions) > 250  # varied phrasings, not one template


@pytest.mark.parametrize("shape", SHAPES)
def test_rendered_shape_has_its_colour_where_it_was_placed(shape):
    row = next(
        r
        for r in plan_split(DemoConfig(num_samples=2000), "train")
        if r.shape == shape and r.count == 1 and r.size == "large" and r.position == "center" and not r.fault
    )
    image = render_scene(row, 128)
    centre = image.getpixel((64, 64))
    assert all(abs(a - b) <= 40 for a, b in zip(centre, COLOURS[row.colour], strict=True)), (row, centre)
    assert render_scene(row, 128).tobytes() == image.tobytes()  # same row, same pixels


def test_texture_covers_the_background_and_leaves_the_shapes_flat():
    # A noisy pool's colour field must not shift a shape's colour (the caption names it): the
    # shapes' pixels are those of the flat render, and the background around them differs.
    from dataclasses import replace

    import numpy as np

    rows = [r for r in plan_split(DemoConfig(num_samples=300), "train") if not r.fault][:40]
    for row in rows:
        flat = np.asarray(render_scene(row, 96), np.int16)
        textured = np.asarray(render_scene(replace(row, texture=True), 96), np.int16)
        background = flat[0, 0]
        shape = np.any(flat != background, axis=-1)
        assert shape.any() and (textured[shape] == flat[shape]).all(), row
        assert np.abs(textured[~shape] - flat[~shape]).max() > 10, row


def test_no_shape_is_cut_by_the_image_border():
    # Captions promise "three stars": a star half off the canvas would break that promise.
    for row in [r for r in plan_split(DemoConfig(num_samples=1500), "train") if not r.fault]:
        image = render_scene(row, 64)
        background = image.getpixel((0, 0))
        border = [image.getpixel((x, y)) for x in range(64) for y in (0, 63)]
        border += [image.getpixel((x, y)) for y in range(64) for x in (0, 63)]
        assert all(pixel == background for pixel in border), row


def test_loopback_server_serves_404s_and_stops(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"abc")
    with serve_folder(tmp_path) as url:
        assert url.startswith("http://127.0.0.1:")
        assert urllib.request.urlopen(f"{url}/a.jpg", timeout=5).read() == b"abc"
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{url}/b.jpg", timeout=5)
        assert missing.value.code == 404
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{url}/a.jpg", timeout=5)


def test_loopback_server_stops_on_error(tmp_path):
    with pytest.raises(RuntimeError), serve_folder(tmp_path) as url:
        raise RuntimeError("boom")
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{url}/", timeout=5)


def test_demo_layout_and_corpus_description(demo_shards):
    corpus = json.loads((demo_shards / "corpus.json").read_text())
    assert len(corpus["classes"]) == len(ALL_COMBOS)
    assert sum(c["held_out"] for c in corpus["classes"]) == len(HELD_OUT)
    assert {tuple(p) for p in corpus["held_out"]} == set(HELD_OUT)
    assert "red triangle" in [c["name"] for c in corpus["classes"]]
    for split in ("train", "val", "heldout"):
        folder = demo_shards / split
        assert (folder / "sizes.json").exists() and (folder / "manifest.json").exists()
        sizes = json.loads((folder / "sizes.json").read_text())
        assert sum(sizes.values()) == corpus["splits"][split]["good_rows"]
    assert sorted(p.name for p in demo_shards.iterdir()) == ["corpus.json", "heldout", "train", "val"]


def test_held_out_pairs_never_reach_training_shards(demo_shards):
    for split in ("train", "val"):
        metadata = _tar_metadata(demo_shards / split)
        assert metadata and all((m["colour"], m["shape"]) not in HELD_OUT for m in metadata)
    heldout = _tar_metadata(demo_shards / "heldout")
    assert {(m["colour"], m["shape"]) for m in heldout} == set(HELD_OUT)


def test_each_sample_carries_its_attributes(demo_shards):
    metadata = _tar_metadata(demo_shards / "val")
    assert all(set(ATTRIBUTE_COLUMNS) <= set(m) for m in metadata)
    assert all(m["colour"] in m["caption"] for m in metadata)


@pytest.mark.parametrize("split", ["train", "val", "heldout"])
def test_planted_failures_are_counted_by_reason(demo_shards, split):
    corpus = json.loads((demo_shards / "corpus.json").read_text())
    planted = corpus["splits"][split]["planted_faults"]
    manifest = json.loads((demo_shards / split / "manifest.json").read_text())
    assert manifest["failure_reasons"] == {
        "http 404": planted["dead_url"],
        "undecodable image": planted["not_an_image"] + planted["truncated_image"],
    }
    assert manifest["totals"]["success"] == corpus["splits"][split]["good_rows"]


def test_incremental_rerun_of_complete_demo_skips_and_changed_seed_is_refused(
    demo_shards, demo_args, run_cli, tmp_path
):
    root = tmp_path / "corpus"
    shutil.copytree(demo_shards, root)
    listing = sorted(str(p) for p in root.rglob("*"))
    again = run_cli("data_pipeline.shards", *demo_args(root, "--incremental"))
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr
    other_seed = demo_args(root, "--incremental")
    other_seed[other_seed.index("--seed") + 1] = "1"
    refused = run_cli("data_pipeline.shards", *other_seed)
    assert refused.returncode == 2 and "seed was 0, now 1" in refused.stderr
    assert sorted(str(p) for p in root.rglob("*")) == listing


def test_noise_is_planted_on_top_of_the_clean_rows_with_its_truth():
    from data_pipeline.demo_noise import NOISE_RATES, noise_truth, plan_pool
    from data_pipeline.shape_rendering import render_scene

    clean_cfg, noisy_cfg = DemoConfig(num_samples=1000), DemoConfig(num_samples=1000, noise=True)
    clean = plan_split(clean_cfg, "train")
    noisy = plan_pool(noisy_cfg, "train")
    planted = [r for r in noisy if r.noise]
    # The clean rows are the clean corpus's (only drawn over a colour field), in the same order.
    assert [(r.file_name, r.caption) for r in noisy if not r.noise] == [(r.file_name, r.caption) for r in clean]
    truth = noise_truth(noisy_cfg)["rows"]
    assert {r.file_name: r.noise for r in planted} == {name: info["kind"] for name, info in truth.items()}
    counts = {kind: sum(r.noise == kind for r in planted) for kind in NOISE_RATES}
    assert counts == {kind: round(rate * 1000) for kind, rate in NOISE_RATES.items()}
    by_name = {r.file_name: r for r in noisy + plan_split(noisy_cfg, "val") + plan_split(noisy_cfg, "heldout")}
    for name, info in truth.items():
        row = by_name[name]
        if info["kind"] == "exact_duplicate":  # the very same pixels as its source
            assert render_scene(row, 64).tobytes() == render_scene(by_name[info["of"]], 64).tobytes()
        if info["kind"] == "contamination":
            assert info["of"].startswith(("val_", "heldout_"))
        if info["kind"] == "mismatched_caption":
            assert row.colour not in row.caption or row.shape not in row.caption
    assert plan_split(noisy_cfg, "val")[0].texture and not plan_split(clean_cfg, "val")[0].texture
    # A trusted seed set for such a pool: drawn the same way, nothing planted.
    textured = DemoConfig(num_samples=1000, texture=True)
    assert all((r.texture or r.fault) and not r.noise for r in plan_pool(textured, "train"))
    assert [r.caption for r in plan_pool(textured, "train")] == [r.caption for r in clean]


def test_a_pool_planted_at_other_noise_rates_is_another_pool(tmp_path):
    """An incremental rerun into a pool built at other noise rates (an older version's) stops in
    one line instead of adding shards planted at the new rates to the old ones."""
    from data_pipeline.demo_build import _check_same_corpus
    from data_pipeline.demo_noise import NOISE_RATES
    from data_pipeline.errors import UserError
    from data_pipeline.shard_config import ShardConfig

    generator = {"seed": 0, "noise": True}
    (tmp_path / "corpus.json").write_text(json.dumps({"generator": generator}))
    now = {"generator": {**generator, "noise_rates": dict(NOISE_RATES)}}
    with pytest.raises(UserError, match="noise_rates was None, now"):
        _check_same_corpus(ShardConfig(output=str(tmp_path)), now)
    (tmp_path / "corpus.json").write_text(json.dumps(now))
    _check_same_corpus(ShardConfig(output=str(tmp_path)), now)  # the same rates: resumes
