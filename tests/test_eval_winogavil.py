"""WinoGAViL from a fake of its Hugging Face Arrow copy: the Jaccard metric and its chance level on
known answers, the suite against a brute-force recomputation, bad layouts one line. (The 2-rank
== 1-rank check runs in test_eval_datacomp, whose fake --wds-root holds this fake too.)"""

from __future__ import annotations

import io
import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from sklearn.metrics import jaccard_score

from data_pipeline.errors import UserError
from eval.winogavil import chance_jaccard, find_copy, jaccard, prompt, read_instances
from training.data.transforms import build_eval_transform
from training.model.trained import load_trained_model

WORDS = ["red", "green", "blue", "yellow", "orange", "purple", "white", "black", "grey", "pink",
         "brown", "cyan"]
# (cue, number of candidates, number of associations)
INSTANCES = [("red", 5, 2), ("Apple", 6, 2), ("blue", 10, 3), ("orange", 12, 4), ("green", 10, 2)]


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.full((40, 40, 3), rng.integers(0, 256, 3), dtype=np.uint8)
    pixels[rng.integers(0, 30) :][:8] = rng.integers(0, 256, 3)  # a band: no two images alike
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_winogavil_copy(root: Path) -> Path:
    """A fake of DataComp's download: the HF cache's winogavil-test.arrow (Arrow stream format,
    the datasets library's schema: candidate_images a list of {bytes, path}). One image is given
    by path, as a dataset built from files stores it."""
    folder = root / "hf_cache" / "nlphuji___winogavil" / "default" / "0.0.0" / "f00d"
    folder.mkdir(parents=True)
    rows = []
    for n, (cue, count, k) in enumerate(INSTANCES):
        candidates = WORDS[:count]
        images = [{"bytes": _png(100 * n + c), "path": None} for c in range(count)]
        if n == 1:
            (folder / "images").mkdir()
            (folder / "images" / "cand0.png").write_bytes(images[0]["bytes"])
            images[0] = {"bytes": None, "path": "images/cand0.png"}
        rows.append({"cue": cue, "candidates": candidates, "associations": candidates[1 : 1 + k],
                     "candidate_images": images, "num_associations": k})
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("cue", pa.string()), ("candidates", pa.list_(pa.string())),
                        ("associations", pa.list_(pa.string())),
                        ("candidate_images", pa.list_(image)), ("num_associations", pa.int64())])
    table = pa.Table.from_pylist(rows, schema=schema)
    path = folder / "winogavil-test.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(table)
    return path


def test_jaccard_and_its_chance_known_answers():
    truth = torch.tensor([True, False, True, False, False])
    assert jaccard(torch.tensor([0.9, 0.1, 0.8, 0.2, 0.0]), truth) == 1.0
    # picks 0 and 3: one of two right -> 1 / 3
    assert jaccard(torch.tensor([0.9, 0.1, 0.2, 0.8, 0.0]), truth) == pytest.approx(1 / 3)
    assert jaccard(torch.tensor([0.0, 0.9, 0.1, 0.8, 0.2]), truth) == 0.0
    assert jaccard(torch.tensor([0.9, 0.1, 0.2, 0.8, 0.0]), truth) == pytest.approx(
        jaccard_score(truth.numpy(), np.array([1, 0, 0, 1, 0], dtype=bool)))
    for n, k in [(5, 2), (6, 3), (12, 4)]:
        truth = set(range(k))  # every k-subset equally likely: the exact mean by enumeration
        picks = list(combinations(range(n), k))
        mean = sum(len(truth & set(p)) / len(truth | set(p)) for p in picks) / len(picks)
        assert chance_jaccard(n, k) == pytest.approx(mean)
    assert prompt("Apple") == "An apple" and prompt("werewolf") == "A werewolf"


def test_suite_matches_brute_force(trained_run, tmp_path, run_cli):
    arrow = write_winogavil_copy(tmp_path / "root")
    checkpoint = trained_run / "checkpoints" / "step_00000006.pt"
    out = tmp_path / "eval"
    result = run_cli("eval.run", "--checkpoint", str(checkpoint), "--suite", "datacomp",
                     "--wds-root", str(tmp_path / "root"), "--out", str(out), "--precision",
                     "fp32", "--workers", "0", "--batch-size", "4", "--no-plot")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "WinoGAViL" in result.stdout and "jaccard_score_10-12" in result.stdout
    assert "missing (37 of 38)" in result.stdout
    got = json.loads((out / "step_00000006" / "misc-winogavil.zeroshot_association.json")
                     .read_text())

    trained = load_trained_model(checkpoint)
    transform = build_eval_transform(trained.image_size)
    scores, sizes = [], []
    with torch.no_grad():
        for inst in read_instances([arrow]):
            cue = trained.model.encode_text(trained.tokenizer([prompt(inst.cue)]), normalize=True)[0]
            sims = []
            for source in inst.images:
                data = source if isinstance(source, bytes) else source.read_bytes()
                with Image.open(io.BytesIO(data)) as im:
                    sims.append(float(trained.model.encode_image(
                        transform(im.convert("RGB"))[None], normalize=True)[0] @ cue))
            k = sum(inst.truth)
            chosen = np.zeros(len(sims), dtype=bool)
            chosen[np.argsort(sims)[-k:]] = True
            scores.append(jaccard_score(np.array(inst.truth), chosen))
            sizes.append(len(sims))
    scores, sizes = np.array(scores), np.array(sizes)
    expected = {"avg_jaccard_score": scores.mean(), "jaccard_score_5": scores[sizes == 5].mean(),
                "jaccard_score_6": scores[sizes == 6].mean(),
                "jaccard_score_10": scores[sizes == 10].mean(),
                "jaccard_score_12": scores[sizes == 12].mean(),
                "jaccard_score_5-6": scores[sizes <= 6].mean(),
                "jaccard_score_10-12": scores[sizes >= 10].mean()}
    assert got["metrics"] == pytest.approx(expected, abs=1e-6)
    assert got["num_images"] == sizes.sum()
    assert got["chance"]["jaccard_score_10-12"] == 0.205  # tasklist.yml's random score
    summary = json.loads((out / "step_00000006" / "datacomp.aggregate.json").read_text())
    assert summary["details"]["tasks_present"] == ["WinoGAViL"]
    assert summary["metrics"]["retrieval"] == pytest.approx(expected["jaccard_score_10-12"])


def test_bad_layouts_are_one_line(tmp_path, run_cli):
    empty = tmp_path / "root" / "hf_cache" / "nlphuji___winogavil"
    empty.mkdir(parents=True)
    with pytest.raises(UserError, match="no winogavil-test.arrow"):
        find_copy(tmp_path / "root", ())
    bad = empty / "winogavil-test.arrow"
    table = pa.table({"cue": ["red"], "candidates": [["red", "blue"]]})
    with pa.OSFile(str(bad), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    result = run_cli("eval.run", "--checkpoint", str(tmp_path / "x.pt"), "--suite", "datacomp",
                     "--wds-root", str(tmp_path / "root"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "no column associations, candidate_images" in lines[0]
    bad.write_bytes(b"not arrow")
    with pytest.raises(UserError, match="not an Arrow file"):
        read_instances([bad])
