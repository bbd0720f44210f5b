"""Architectures from the run config: [model.vision]/[model.text] tables and OpenCLIP JSON files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.config_loading import ConfigError
from training.interop.openclip_layout import to_openclip_state_dict
from training.model import build_model
from training.model.openclip_json import OpenClipConfigError, from_openclip_config
from training.run_config import load_run_config

open_clip = pytest.importorskip("open_clip")  # a test-only reference (the dev extra)
OPENCLIP_CONFIGS = Path(open_clip.__file__).parent / "model_configs"

# The benchmark's architecture (issue: sample efficiency against OpenCLIP), as an OpenCLIP file.
SMALL_VIT = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 128, "layers": 6, "width": 256, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", ["ViT-S-32", "ViT-B-32", "ViT-B-32-quickgelu"])
def test_openclip_json_builds_the_same_sized_towers_as_openclip(name):
    data = json.loads((OPENCLIP_CONFIGS / f"{name}.json").read_text())
    ours = build_model(from_openclip_config(data, name))
    theirs = open_clip.create_model(name, pretrained=None)
    assert _count(ours.visual) == _count(theirs.visual)
    text_theirs = _count(theirs) - _count(theirs.visual) - 1  # minus logit_scale
    assert _count(ours.text) == text_theirs
    if name.endswith("quickgelu"):
        assert ours.cfg.text.activation == "quick_gelu"
        assert "quickgelu" in ours.cfg.vision.timm_name


def test_small_vit_json_equals_openclip_in_size_and_runs():
    ours = build_model(from_openclip_config(SMALL_VIT))
    reference = open_clip.model.CLIP(SMALL_VIT["embed_dim"], SMALL_VIT["vision_cfg"],
                                     SMALL_VIT["text_cfg"])
    assert _count(ours) == _count(reference)
    out = ours(torch.randn(2, 3, 128, 128), torch.tensor([[49406, 320, 49407], [49406, 49407, 0]]))
    assert out["image_features"].shape == out["text_features"].shape == (2, 256)


@pytest.mark.parametrize("change, message", [
    ({"vision_cfg": {"layers": [3, 4, 6, 3], "width": 64}}, "ModifiedResNet"),
    ({"text_cfg": {"hf_model_name": "roberta-base"}}, r"text_cfg\.hf_model_name"),
    ({"vision_cfg": {"layers": 2, "width": 64, "attentional_pool": True}}, "attentional_pool"),
    ({"multimodal_cfg": {}}, "multimodal_cfg"),
])
def test_unsupported_openclip_keys_are_named(change, message):
    data = {**SMALL_VIT, **change}
    with pytest.raises(OpenClipConfigError, match=message):
        from_openclip_config(data)


def test_defaults_restated_in_the_json_are_accepted():
    data = json.loads(json.dumps(SMALL_VIT))
    data["vision_cfg"].update(head_width=64, mlp_ratio=4.0, pool_type="tok")
    data["text_cfg"].update(pool_type="argmax", no_causal_mask=False)
    assert from_openclip_config(data) == from_openclip_config(SMALL_VIT)


def test_model_tables_override_the_preset():
    cfg = load_run_config(None, [
        "data.train_shards=x", "model.name=tiny", "model.embed_dim=96",
        "model.vision.width=96", "model.vision.layers=2", "model.vision.heads=3",
        "model.text.width=64", "model.text.layers=1", "model.text.heads=2",
        "model.text.context_length=16",
    ])
    arch = cfg.model.architecture(image_size=32)
    assert arch.embed_dim == 96 and arch.vision.image_size == 32
    assert arch.vision.timm_kwargs == {"patch_size": 8, "embed_dim": 96, "depth": 2, "num_heads": 3}
    assert (arch.text.width, arch.text.layers, arch.text.heads, arch.text.context_length) == (64, 1, 2, 16)
    model = build_model(arch)
    assert len(model.visual.trunk.blocks) == 2 and len(model.text.blocks) == 1


def test_bad_tables_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="unknown config key model.vision.depht"):
        load_run_config(None, ["data.train_shards=x", "model.vision.depht=3"])
    cfg = load_run_config(None, ["data.train_shards=x", "model.text.width=100", "model.text.heads=3"])
    with pytest.raises(ValueError, match="not divisible"):
        cfg.model.architecture(64)


def test_openclip_json_through_the_run_config(tmp_path):
    path = tmp_path / "small.json"
    path.write_text(json.dumps(SMALL_VIT))
    cfg = load_run_config(None, ["data.train_shards=x", f"model.openclip_config={path}"])
    with pytest.raises(ValueError, match="data.image_size=128"):
        cfg.model.architecture(64)
    assert cfg.model.architecture(128) == from_openclip_config(SMALL_VIT, str(path))


def test_init_draws_both_towers_like_openclip():
    """init="clip" (what OpenCLIP JSON ViTs and our ViT presets get) and the text tower's CLIP
    init: every tensor has OpenCLIP's initial distribution. Zero tensors are zero in both; the
    rest agree in standard deviation within a few percent (different random draws, same law).
    timm's own ViT init is several times off for some (what made our ViT learn less per
    sample); the text MLP biases once started at zero where OpenCLIP leaves nn.Linear's."""
    torch.manual_seed(0)
    ours = to_openclip_state_dict(build_model(from_openclip_config(SMALL_VIT)))
    reference = open_clip.model.CLIP(SMALL_VIT["embed_dim"], SMALL_VIT["vision_cfg"],
                                     SMALL_VIT["text_cfg"]).state_dict()
    assert set(ours) == set(reference)
    for name, tensor in ours.items():
        tensor, theirs = tensor.float(), reference[name].float()
        if theirs.std() == 0 or tensor.numel() == 1:
            torch.testing.assert_close(tensor, theirs, msg=name)  # LayerNorms, zero biases
            continue
        ratio = (tensor.std() / theirs.std()).item()
        assert 0.9 < ratio < 1.1, f"{name}: std {tensor.std():.4f} vs OpenCLIP's {theirs.std():.4f}"
        assert abs(tensor.mean().item()) < 0.2 * theirs.std().item() + 1e-3, name
    timm_cfg = from_openclip_config(SMALL_VIT)
    timm_cfg.vision.init = "timm"
    timm_pos = to_openclip_state_dict(build_model(timm_cfg))["visual.positional_embedding"]
    assert timm_pos.std() < 0.5 * reference["visual.positional_embedding"].std()


def test_vision_init_choice():
    cfg = load_run_config(None, ["data.train_shards=x", "model.name=tiny"])
    assert cfg.model.architecture(64).vision.init == "clip"  # ViT presets: OpenCLIP's init
    cfg = load_run_config(None, ["data.train_shards=x", "model.name=tiny_cnn"])
    assert cfg.model.architecture(64).vision.init == "timm"
    # a new trunk from a table gets the init that suits it, unless the table says
    for name, expected in (("resnet10t", "timm"), ("vit_base_patch16_clip_224", "clip")):
        cfg = load_run_config(None, ["data.train_shards=x", "model.name=tiny",
                                     f"model.vision.timm_name={name}"])
        assert cfg.model.architecture(64).vision.init == expected
    cfg = load_run_config(None, ["data.train_shards=x", "model.name=tiny", "model.vision.init=timm"])
    assert cfg.model.architecture(64).vision.init == "timm"
    with pytest.raises(ValueError, match="vision init must be one of"):
        load_run_config(None, ["data.train_shards=x", "model.vision.init=xavier"]).model.architecture(64)
    cfg = load_run_config(None, ["data.train_shards=x", "model.name=tiny_cnn", "model.vision.init=clip"])
    with pytest.raises(ValueError, match="needs a timm VisionTransformer, not ResNet"):
        build_model(cfg.model.architecture(64))
