"""The curation stage end to end on pools with planted noise.

Pool 1: the demo corpus's train shards (img2dataset wrote them, with its parquet) plus a shard
"made elsewhere" (our own tar, no parquet) holding exact copies, boilerplate and German
captions. Pool 2: photo-like images (smooth colour fields with grain, what perceptual hashes are
made for) with JPEG re-encodes, resizes and copies of an ImageFolder eval set planted in it.
Every planted pair must be removed by the step meant for it, and nothing else may be. (The
demo's flat renders are no pool for perceptual hashes: different renders collide, see
NearDuplicateConfig.)
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import REPO_ROOT, train_tiny_run
from data_pipeline.shard_format import decode_caption, read_shard

TORCH_ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def _samples(folder: Path) -> list[dict]:
    return [raw for tar in sorted(folder.glob("*.tar")) for raw in read_shard(str(tar))
            if not raw.get("__error__")]


def _tar(path: Path, samples: list[tuple[str, bytes, str]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, jpg, caption in samples:
            for ext, data in (("jpg", jpg), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _reencode(jpg: bytes, quality: int) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(jpg)).convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


@pytest.fixture(scope="module")
def noisy_pool(demo_shards, tmp_path_factory):
    """-> (pool spec, root, {planted kind: set of keys in the noise shard})."""
    root = tmp_path_factory.mktemp("curate_pool")
    train = root / "train"
    shutil.copytree(demo_shards / "train", train)
    clean = _samples(train)
    planted: dict[str, set[str]] = {"exact": set(), "boilerplate": set(), "german": set()}
    noise = []
    for i in range(6):
        src = clean[i * 7]
        noise.append((f"n{i:03d}", src["jpg"], decode_caption(src)))
        planted["exact"].add(f"n{i:03d}")
    fresh = _samples(demo_shards / "heldout")  # images the pool does not hold otherwise
    for i, caption in enumerate(["IMG_2041.jpg", "click here to download", "http://example.com/a.jpg"]):
        noise.append((f"b{i:03d}", fresh[i]["jpg"], caption))
        planted["boilerplate"].add(f"b{i:03d}")
    for i, caption in enumerate(["ein roter Kreis auf einem blauen Hintergrund in der Mitte",
                                 "zwei grüne Sterne auf schwarzem Hintergrund oben"]):
        noise.append((f"g{i:03d}", fresh[10 + i]["jpg"], caption))
        planted["german"].add(f"g{i:03d}")
    extra = root / "elsewhere"
    extra.mkdir()
    _tar(extra / "00000.tar", noise)
    return f"{train}::{extra}", root, planted


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_curate_removes_what_was_planted_and_nothing_else(noisy_pool, demo_shards, run_cli, tmp_path):
    spec, root, planted = noisy_pool
    before = _digest(root / "train"), _digest(root / "elsewhere")
    out = tmp_path / "curated"
    result = run_cli("data_pipeline.curate", "--shards", spec, "--out", str(out),
                     "--no-hash-dedup", "--workers", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (_digest(root / "train"), _digest(root / "elsewhere")) == before  # input untouched
    keep = pd.read_parquet(out / "keep_list.parquet")
    noise = keep[keep["shard"].str.contains("elsewhere")].set_index("key")
    by = noise["removed_by"].to_dict()
    assert {k: by[k] for k in planted["exact"]} == {k: "exact_duplicates" for k in planted["exact"]}
    assert {k: by[k] for k in planted["boilerplate"] | planted["german"]} == {
        k: "captions" for k in planted["boilerplate"] | planted["german"]}
    assert noise.loc["g000", "reason"] == "language: de"
    # The demo corpus itself is clean: English captions, no two images alike.
    demo_rows = keep[~keep["shard"].str.contains("elsewhere")]
    assert demo_rows["kept"].all(), demo_rows[~demo_rows["kept"]][["key", "removed_by", "reason"]]
    # The copies' kept originals are the demo's (earlier in pool order), named in the reason.
    assert noise.loc["n000", "reason"].startswith("copy of 00000.tar#")
    # Outputs: curated shards with sizes.json agreeing with the tars; the report; the grids.
    sizes = json.loads((out / "shards" / "sizes.json").read_text())
    written = _samples(out / "shards")
    assert sum(sizes.values()) == len(written) == int(keep["kept"].sum())
    assert {raw["__key__"] for raw in written} == set(keep.loc[keep["kept"], "key"])
    report = json.loads((out / "report.json").read_text())
    assert report["pairs_in"] == len(keep) and report["pairs_kept"] == int(keep["kept"].sum())
    assert report["with_download_sha256"] == len(demo_rows)  # img2dataset's parquet, carried along
    assert {s["step"]: s["removed"] for s in report["steps"]} == {"captions": 5, "exact_duplicates": 6}
    for step in ("captions", "exact_duplicates"):
        assert (out / "grids" / f"{step}.jpg").is_file()
    assert "curation:" in result.stdout and "exact_duplicates" in result.stdout

    # A rerun reuses every sidecar (same bytes, untouched files) and decides the same.
    sidecars = {p: p.stat().st_mtime_ns for p in (out / "_work").rglob("*.parquet")}
    again = run_cli("data_pipeline.curate", "--shards", spec, "--out", str(out),
                    "--no-hash-dedup", "--workers", "1")
    assert again.returncode == 0, again.stderr
    assert {p: p.stat().st_mtime_ns for p in sidecars} == sidecars
    pd.testing.assert_frame_equal(pd.read_parquet(out / "keep_list.parquet"), keep)


def test_bad_input_is_one_line_and_changes_nothing(noisy_pool, run_cli, tmp_path):
    spec, root, _ = noisy_pool
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cases = {
        "holds files that are not ours": ["--out", str(foreign)],
        "no such file or run folder": ["--out", str(tmp_path / "a"), "--checkpoint", str(tmp_path / "nope")],
        "expected KIND=PATH": ["--out", str(tmp_path / "b"), "--decontaminate", "demo"],
        "unknown eval set kind": ["--out", str(tmp_path / "c"), "--decontaminate", "mnist=/x"],
        "needs an embedding model": ["--out", str(tmp_path / "d"), "--clip-score-top", "0.3"],
        "is the input shard folder": ["--out", str(root / "train")],
        "expected the cifar-10-batches-py folder": ["--out", str(tmp_path / "e"), "--decontaminate",
                                                    f"cifar10={foreign}"],
    }
    for expected, args in cases.items():
        result = run_cli("data_pipeline.curate", "--shards", spec, *args, "--no-caption-filter")
        assert result.returncode == 2, (expected, result.stderr)
        assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert (foreign / "notes.txt").read_text() == "mine" and sorted(foreign.iterdir()) == [foreign / "notes.txt"]
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


def _photo(seed: int, size: int = 128) -> Image.Image:
    """A smooth random colour field with grain: structure at every scale, like a photo."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray((rng.random((6, 6, 3)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    grain = rng.random((size, size, 3)) * 40 - 20
    return Image.fromarray(np.clip(np.asarray(field, float) + grain, 0, 255).astype(np.uint8))


def _jpeg(image: Image.Image, quality: int = 92) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def test_near_duplicates_and_eval_copies_by_perceptual_hash(run_cli, tmp_path):
    pool, evalset = tmp_path / "pool", tmp_path / "evalset"
    pool.mkdir()
    samples = [(f"p{i:03d}", _jpeg(_photo(i)), f"a photo of scene number {i}") for i in range(120)]
    planted = {}
    for i in range(8):  # re-encodes and resizes of pool images, later in pool order
        image = _photo(i * 5)
        variant = _jpeg(image, 60) if i % 2 else _jpeg(image.resize((100, 100)))
        samples.append((f"q{i:03d}", variant, f"another photo of scene {i * 5}"))
        planted[f"q{i:03d}"] = "near_duplicates_hash"
    for i in range(4):  # copies (re-encoded) of eval images
        eval_image = _photo(1000 + i)
        (evalset / "val" / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        eval_image.save(evalset / "val" / f"class{i % 2}" / f"{i}.png")
        samples.append((f"e{i:03d}", _jpeg(eval_image, 80), f"a photo of test item {i}"))
        planted[f"e{i:03d}"] = "decontaminate"
    _tar(pool / "00000.tar", samples)
    out = tmp_path / "out"
    result = run_cli("data_pipeline.curate", "--shards", str(pool), "--out", str(out),
                     "--decontaminate", f"imagefolder={evalset}", "--languages", "any", "--workers", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    keep = pd.read_parquet(out / "keep_list.parquet").set_index("key")
    removed = keep.loc[~keep["kept"], "removed_by"].to_dict()
    assert removed == planted
    report = json.loads((out / "report.json").read_text())
    assert report["steps"][1]["notes"] == ["imagefolder: 4 pool images match its 4"]
    assert keep.loc["q001", "reason"] == "copy of 00000.tar#p005 (phash within 6 bits)"


@pytest.fixture(scope="module")
def tiny_checkpoint(demo_shards, tmp_path_factory) -> Path:
    return train_tiny_run(demo_shards / "train", tmp_path_factory.mktemp("curate_model"),
                          "train.steps=4", "checkpoint.every=4")


def test_embedding_pass_alignment_resume_and_ranks(demo_shards, tiny_checkpoint, run_cli, tmp_path):
    import subprocess
    import sys

    args = ["--shards", str(demo_shards / "train"), "--checkpoint", str(tiny_checkpoint),
            "--clip-score-top", "0.5", "--no-near-dedup", "--languages", "any", "--no-shards",
            "--embed-batch-size", "64", "--precision", "fp32", "--workers", "1"]
    out = tmp_path / "one"
    result = run_cli("data_pipeline.curate", *args, "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    keep = pd.read_parquet(out / "keep_list.parquet")
    # The top half by CLIP score over the whole pool (ties at the cut kept). (Embedding dedup is
    # off: a 4-step model maps every image to nearly one point.)
    cut = keep["clip_score"].quantile(0.5, interpolation="higher")
    assert (keep["removed_by"] == "alignment").sum() == (keep["clip_score"] < cut).sum()
    assert 0.45 <= keep["kept"].mean() <= 0.55
    assert (out / "clip_scores.png").is_file()
    sidecars = sorted((out / "_work" / "embed").glob("*.npz"))
    assert len(sidecars) == 4
    with np.load(sidecars[0]) as stored:  # embeddings as stored, float16 and per shard
        assert stored["image"].dtype == np.float16 and stored["image"].shape[0] == len(stored["keys"])

    # An interrupted pass resumes: a lost sidecar is recomputed, the others are reused.
    stamps = {p: p.stat().st_mtime_ns for p in sidecars}
    sidecars[2].unlink()
    result = run_cli("data_pipeline.curate", *args, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert {p: p.stat().st_mtime_ns for p in sidecars if p != sidecars[2]} == {
        p: t for p, t in stamps.items() if p != sidecars[2]}
    assert sidecars[2].is_file()
    pd.testing.assert_frame_equal(pd.read_parquet(out / "keep_list.parquet"), keep)

    # Two torchrun ranks, each its slice of the shards: the same decisions.
    two = tmp_path / "two"
    ranks = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "data_pipeline.curate", *args, "--out", str(two)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert ranks.returncode == 0, ranks.stdout + ranks.stderr
    pd.testing.assert_frame_equal(pd.read_parquet(two / "keep_list.parquet"), keep, atol=2e-3, check_exact=False)


def test_noisy_demo_pool_bootstrapped_curation_finds_the_planted_truth(run_cli, demo_args, tmp_path):
    """`shards --noise` plants web-like noise with its truth; `curate --bootstrap` (a filter CLIP
    trained on a separate trusted corpus) with pixel dedup finds each planted kind with its
    step, and removes no clean pair by dedup, decontamination or the caption filter."""
    pool, trusted = tmp_path / "pool", tmp_path / "trusted"
    built = run_cli("data_pipeline.shards", *demo_args(pool, "--noise"))
    assert built.returncode == 0, built.stderr
    built = run_cli("data_pipeline.shards", *demo_args(trusted, "--seed", "7", "--texture"))
    assert built.returncode == 0, built.stderr
    assert not (trusted / "noise.json").exists()  # drawn like the pool, without its noise
    truth = json.loads((pool / "noise.json").read_text())["rows"]
    out = tmp_path / "curated"
    result = run_cli("data_pipeline.curate", "--shards", str(pool / "train"), "--out", str(out),
                     "--bootstrap", str(trusted / "train"), "--bootstrap-set", "train.steps=4",
                     "--bootstrap-set", "data.image_size=32", "--bootstrap-set", "data.workers=0",
                     "--clip-score-top", "0.9", "--no-hash-dedup", "--pixel-dedup", "--no-model-dedup",
                     "--decontaminate", f"demo={pool}", "--no-shards", "--workers", "1", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    keep = pd.read_parquet(out / "keep_list.parquet")
    url_of = {}
    for parquet in (pool / "train").glob("*.parquet"):
        table = pd.read_parquet(parquet, columns=["key", "url", "status"])
        url_of.update({k: u.rsplit("/", 1)[1] for k, u, s in table.itertuples(index=False) if s == "success"})
    keep["file"] = [url_of[k] for k in keep["key"]]
    keep["kind"] = [truth.get(f, {}).get("kind", "clean") for f in keep["file"]]
    row = keep.set_index("file")
    for kind, step in {"contamination": "decontaminate", "other_language": "captions",
                       "boilerplate": "captions"}.items():
        planted = keep[keep["kind"] == kind]
        assert len(planted) > 0 and (planted["removed_by"] == step).all(), (kind, planted["removed_by"].tolist())
    # A planted copy and its source are one image: at most one survives, and where both were
    # still in when dedup ran, its step removed the later one.
    sources = set()
    for kind, step in {"exact_duplicate": "exact_duplicates", "near_duplicate": "near_duplicates_pixels"}.items():
        copies = [(f, info["of"]) for f, info in truth.items() if info["kind"] == kind and f in row.index]
        assert copies
        for copy, source in copies:
            sources.add(source)
            pair = row.loc[[copy, source]]
            assert not pair["kept"].all(), (kind, copy, source)
            if not pair["removed_by"].isin(["captions", "decontaminate", "alignment"]).any():
                assert sorted(pair["removed_by"].fillna("")) == ["", step], (kind, pair["removed_by"].tolist())
    dedup = keep["removed_by"].isin(["exact_duplicates", "near_duplicates_pixels"])
    assert set(keep.loc[dedup & (keep["kind"] == "clean"), "file"]) <= sources  # only sources of copies
    assert set(keep.loc[keep["kind"] == "clean", "removed_by"].dropna()) <= {
        "alignment", "exact_duplicates", "near_duplicates_pixels"}
    report = json.loads((out / "report.json").read_text())
    assert report["bootstrapped_from"] == str(trusted / "train")
    assert (out / "_work" / "filter" / "run").is_dir()

    # The demo's closing table: a run on the keep-list reports what curation removed, and the
    # planted truth scored by data_pipeline.curate.truth agrees with the checks above.
    from data_pipeline.curate import truth as planted_truth

    scores = {r["kind"]: r for r in planted_truth.filter_scores(keep.drop(columns=["file", "kind"]),
                                                                 planted_truth.truth_by_key(pool))}
    for kind in ("contamination", "other_language", "boilerplate", "exact_duplicate", "near_duplicate"):
        assert scores[kind]["recall"] == 1.0 and scores[kind]["planted"] > 0, scores[kind]
    run_dir = tmp_path / "run"
    trained = run_cli("training.main", "--config", "configs/tiny_demo.toml",
                      f"data.train_shards={pool / 'train'}", f"data.keep_list={out / 'keep_list.parquet'}",
                      f"tokenizer={out / '_work' / 'filter' / 'tokenizer.json'}", f"train.run_dir={run_dir}",
                      "train.steps=2", "data.image_size=32", "data.workers=0", "data.batch_size=16",
                      "log.progress_bar=false", timeout=300)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    table = run_cli("training.report", "--run-dir", str(run_dir), "--shards", str(pool))
    assert table.returncode == 0, table.stderr
    rows = dict(line.split(" | ", 1) for line in table.stdout.splitlines() if " | " in line)
    rows = {k.strip(): v for k, v in rows.items()}
    assert rows["curation"].startswith(f"{report['pairs_in']:,} pairs in -> {report['pairs_kept']:,} kept")
    assert "eval copies 100% of" in rows["planted noise removed"]


def test_datacomp_subset_file_is_sorted_u8_pairs_of_the_kept_uids(tmp_path):
    from data_pipeline.curate.decisions import write_datacomp_uids

    uids = ["6e356964a967af455c8016b75d691203", "139e4a9b22a614771f06c700a8ebe150", "ff" * 16]
    frame = pd.DataFrame({"uid": uids, "kept": [True, True, False]})
    path = write_datacomp_uids(frame, tmp_path)
    array = np.load(path)
    assert array.dtype == np.dtype("u8,u8") and array.shape == (2,)
    assert [f"{a:016x}{b:016x}" for a, b in array.tolist()] == sorted(uids[:2])
    assert write_datacomp_uids(frame.assign(uid=[None, "x", "y"]), tmp_path / "no") is None
