"""Exporting our checkpoints for OpenCLIP and CLIP_benchmark, and back.

A checkpoint in our format (a ViT-B/32 QuickGELU with CLIP's tokenizer, randomly initialised)
goes through the export CLI; OpenCLIP must load the files by architecture name and by
`local-dir:`, CLIP_benchmark's model loader must accept them, the weights must be ours
exactly, and importing the export again must give back our state dict bit for bit.
"""

from __future__ import annotations

import json
import math

import open_clip
import pytest
import torch
from clip_benchmark.models import load_clip

from data_pipeline.errors import UserError
from training.checkpoint import save_checkpoint
from training.interop import export
from training.interop.export_checkpoint import export_openclip
from training.interop.import_checkpoint import import_pretrained
from training.interop.openclip_layout import to_openclip_state_dict
from training.model import MODEL_CONFIGS, build_model, with_tokenizer
from training.text.tokenizer import Tokenizer, train_tokenizer
from training.model.trained import load_trained_model

from test_interop_layout import CLIP_BPE


def _our_checkpoint(run_dir, cfg, tokenizer) -> None:
    torch.manual_seed(3)
    model = build_model(cfg)
    with torch.no_grad():  # a trained temperature, not the initial one
        model.logit_scale.fill_(math.log(50.0))
    save_checkpoint(run_dir, 7, {"model": model.state_dict(),
                                 "config": {"model_config": cfg.to_dict()},
                                 "tokenizer": tokenizer.to_json()}, keep=1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    tokenizer = Tokenizer.from_clip_bpe(CLIP_BPE)
    cfg = with_tokenizer(MODEL_CONFIGS["vit_b32_quickgelu"](), tokenizer)
    _our_checkpoint(tmp / "run", cfg, tokenizer)
    assert export.main(["--checkpoint", str(tmp / "run"), "--out", str(tmp / "out")]) == 0
    return load_trained_model(next((tmp / "run" / "checkpoints").glob("*.pt"))), tmp / "out"


def test_export_writes_weights_and_configs(exported):
    _, out = exported
    assert sorted(p.name for p in out.iterdir()) == [
        "ViT-B-32-quickgelu.json", "open_clip_config.json", "open_clip_pytorch_model.bin"]
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["model_cfg"] == open_clip.get_model_config("ViT-B-32-quickgelu")
    assert json.loads((out / "ViT-B-32-quickgelu.json").read_text()) == config["model_cfg"]


def test_openclip_loads_the_export_exactly(exported):
    trained, out = exported
    ours = to_openclip_state_dict(trained.model)
    by_name, _, preprocess = open_clip.create_model_and_transforms(
        "ViT-B-32-quickgelu", pretrained=str(out / "open_clip_pytorch_model.bin"))
    by_dir, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    # clip_benchmark eval --model ViT-B-32-quickgelu --pretrained PATH loads through this
    bench_model, _, bench_tokenizer = load_clip(
        model_type="open_clip", model_name="ViT-B-32-quickgelu",
        pretrained=str(out / "open_clip_pytorch_model.bin"), cache_dir=None, device="cpu")
    for model in (by_name, by_dir, bench_model):
        state = model.state_dict()
        assert set(state) == set(ours)
        assert all(torch.equal(state[k], v) for k, v in ours.items())

    torch.manual_seed(4)
    images = torch.randn(2, 3, 224, 224)
    texts = ["a photo of a ship.", "itap of the frog"]
    with torch.no_grad():
        ref_image, ref_text, ref_scale = by_name.eval()(images, bench_tokenizer(texts))
        out_ours = trained.model(images, trained.tokenizer(texts))
    torch.testing.assert_close(out_ours["image_features"], ref_image, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_ours["text_features"], ref_text, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_ours["logit_scale"], ref_scale)


def test_export_reimports_bit_for_bit(exported):
    trained, out = exported
    again = import_pretrained(out / "open_clip_pytorch_model.bin", "vit_b32_quickgelu", CLIP_BPE)
    original = trained.model.state_dict()
    state = again.model.state_dict()
    assert set(state) == set(original)
    assert all(torch.equal(state[k], v) for k, v in original.items())


def test_export_refuses_models_openclip_cannot_build(tmp_path):
    tokenizer = train_tokenizer(["a red circle", "two blue stars"] * 20, 300, tmp_path / "t.json")
    cfg = with_tokenizer(MODEL_CONFIGS["tiny"](), tokenizer)
    _our_checkpoint(tmp_path / "run", cfg, tokenizer)
    trained = load_trained_model(next((tmp_path / "run" / "checkpoints").glob("*.pt")))
    with pytest.raises(UserError, match="no OpenAI/OpenCLIP layout") as err:
        export_openclip(trained, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
