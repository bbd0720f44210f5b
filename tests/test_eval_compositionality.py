"""SugarCrepe and Winoground on fakes in their published layouts: the scores on hand-built
similarities with known answers, the suites against a brute-force recomputation, bad layouts
one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.errors import UserError
from eval.compositionality import sugarcrepe_files, winoground_examples, winoground_scores
from training.data.transforms import build_eval_transform
from training.model.trained import load_trained_model

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220),
           "yellow": (230, 220, 30)}


def test_winoground_scores_known_answer():
    s = torch.tensor([
        [[0.9, 0.1], [0.2, 0.8]],  # all right: text, image, group
        [[0.9, 0.95], [0.2, 0.99]],  # captions pick their images? c0 picks i1: image wrong;
                                     # images pick captions: i0 -> c0, i1 -> c1: text right
        [[0.1, 0.9], [0.8, 0.2]],  # everything swapped: all wrong
        [[0.5, 0.4], [0.6, 0.7]],  # i0 picks c1: text wrong; c0 -> i0, c1 -> i1: image right
    ])
    assert winoground_scores(s) == pytest.approx(
        {"text_score": 2 / 4, "image_score": 2 / 4, "group_score": 1 / 4})


def _image(path: Path, colour: tuple[int, int, int], band: int) -> None:
    pixels = np.full((40, 40, 3), colour, dtype=np.uint8)
    pixels[band : band + 6] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def fakes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compositionality")
    crepe = root / "sugar-crepe"
    names = list(COLOURS)
    for c, category in enumerate(("replace_att", "swap_obj")):
        entries = {}
        for i, name in enumerate(names):
            filename = f"0000000{c}{i:05d}.jpg"
            _image(crepe / "val2017" / filename, COLOURS[name], 3 * i + c)
            other = names[(i + 1 + c) % len(names)]
            entries[str(i)] = {"filename": filename, "caption": f"a {name} square",
                               "negative_caption": f"a {other} square"}
        (crepe / "data").mkdir(parents=True, exist_ok=True)
        (crepe / "data" / f"{category}.json").write_text(json.dumps(entries))
    wino = root / "winoground"
    lines = []
    for n in range(3):
        a, b = names[n], names[n + 1]
        for k, name in enumerate((a, b)):
            _image(wino / "data" / "images" / f"ex_{n}_img_{k}.png", COLOURS[name], 5 * k + n)
        lines.append(json.dumps({"id": n, "image_0": f"ex_{n}_img_0", "image_1": f"ex_{n}_img_1",
                                 "caption_0": f"a {a} thing", "caption_1": f"a {b} thing",
                                 "tag": "Object"}))
    (wino / "data" / "examples.jsonl").write_text("\n".join(lines) + "\n")
    return {"sugarcrepe": crepe, "winoground": wino}


def _embedders(checkpoint: Path):
    trained = load_trained_model(checkpoint)
    transform = build_eval_transform(trained.image_size)

    def image(path: Path) -> torch.Tensor:
        with Image.open(path) as im:
            return trained.model.encode_image(transform(im.convert("RGB"))[None], normalize=True)[0]

    def text(caption: str) -> torch.Tensor:
        return trained.model.encode_text(trained.tokenizer([caption]), normalize=True)[0]

    return image, text


def test_suites_match_brute_force(trained_run, fakes, tmp_path, run_cli):
    checkpoint = trained_run / "checkpoints" / "step_00000006.pt"
    out = tmp_path / "eval"
    result = run_cli("eval.run", "--checkpoint", str(checkpoint), "--suite", "sugarcrepe,winoground",
                     "--sugarcrepe", str(fakes["sugarcrepe"]), "--winoground",
                     str(fakes["winoground"]), "--out", str(out), "--precision", "fp32",
                     "--workers", "0", "--no-plot")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sugarcrepe" in result.stdout and "group_score" in result.stdout
    image, text = _embedders(checkpoint)
    got = json.loads((out / "step_00000006" / "sugarcrepe.compositionality.json").read_text())
    with torch.no_grad():
        expected = {}
        for category in ("replace_att", "swap_obj"):
            entries = json.loads((fakes["sugarcrepe"] / "data" / f"{category}.json").read_text())
            right = []
            for e in entries.values():
                i = image(fakes["sugarcrepe"] / "val2017" / e["filename"])
                right.append(float(i @ text(e["caption"]) > i @ text(e["negative_caption"])))
            expected[category] = sum(right) / len(right)
        expected["average"] = sum(expected.values()) / 2
        assert got["metrics"] == pytest.approx(expected, abs=1e-6)
        assert got["details"]["missing_categories"] == ["add_att", "add_obj", "replace_obj",
                                                        "replace_rel", "swap_att"]

        rows = [json.loads(line) for line in
                (fakes["winoground"] / "data" / "examples.jsonl").read_text().splitlines()]
        text_ok = image_ok = group_ok = 0
        for e in rows:
            imgs = [image(fakes["winoground"] / "data" / "images" / f"{e[f'image_{k}']}.png")
                    for k in (0, 1)]
            caps = [text(e[f"caption_{k}"]) for k in (0, 1)]
            s = [[float(caps[c] @ imgs[i]) for i in (0, 1)] for c in (0, 1)]
            t = s[0][0] > s[1][0] and s[1][1] > s[0][1]
            m = s[0][0] > s[0][1] and s[1][1] > s[1][0]
            text_ok, image_ok, group_ok = text_ok + t, image_ok + m, group_ok + (t and m)
    got = json.loads((out / "step_00000006" / "winoground.compositionality.json").read_text())
    n = len(rows)
    assert got["metrics"] == pytest.approx(
        {"text_score": text_ok / n, "image_score": image_ok / n, "group_score": group_ok / n})


def test_bad_layouts_are_one_line(tmp_path, fakes, run_cli):
    with pytest.raises(UserError, match="none of add_att"):
        sugarcrepe_files(tmp_path)
    with pytest.raises(UserError, match="no COCO val2017 image folder"):
        sugarcrepe_files(fakes["sugarcrepe"] / "data", tmp_path / "nope")
    with pytest.raises(UserError, match="data/examples.jsonl and data/images"):
        winoground_examples(tmp_path)
    result = run_cli("eval.run", "--checkpoint", str(tmp_path / "x.pt"), "--suite", "winoground",
                     "--winoground", str(tmp_path))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --winoground")
