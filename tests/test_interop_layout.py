"""The OpenCLIP layout against OpenCLIP itself: model configs, preprocessing, architectures.

Also the shared helpers of the interop tests (OpenCLIP is their reference; it is a test-only
dependency, the `interop` extra): a randomly initialised OpenCLIP model and CLIP's BPE file,
which open_clip ships inside its package (a local file: nothing is downloaded).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from training.interop.import_checkpoint import openclip_shapes
from training.interop.openclip_layout import ARCHITECTURES, architecture_of, openclip_model_config
from training.model import MODEL_CONFIGS
from training.data.transforms import build_eval_transform

# OpenAI's bpe_simple_vocab_16e6.txt.gz, as bundled with open_clip: the "user-given" BPE file.
CLIP_BPE = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"

# (OpenCLIP name, our config name) of every architecture both know.
PAIRS = [
    ("ViT-B-32", "vit_b32"), ("ViT-B-32-quickgelu", "vit_b32_quickgelu"),
    ("ViT-B-16", "vit_b16"), ("ViT-B-16-quickgelu", "vit_b16_quickgelu"),
    ("ViT-L-14", "vit_l14"), ("ViT-L-14-quickgelu", "vit_l14_quickgelu"),
]


def openclip_reference(name: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised OpenCLIP model in eval mode (no weights are fetched)."""
    torch.manual_seed(seed)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that it initialised randomly
    return open_clip.create_model(name, pretrained=None).eval()


@pytest.mark.parametrize("openclip_name,ours", PAIRS)
def test_model_config_json_is_openclips_own(openclip_name, ours):
    name, model_cfg = openclip_model_config(MODEL_CONFIGS[ours]())
    assert name == openclip_name
    assert model_cfg == open_clip.get_model_config(openclip_name)


def test_every_architecture_has_a_config():
    assert {MODEL_CONFIGS[ours]().vision.timm_name for _, ours in PAIRS} == set(ARCHITECTURES)


# ViT-B/32 is imported and compared number by number in test_interop_import.py; for the other
# sizes the tensor names and shapes suffice (the mapping is per-layer, the same at any size).
@pytest.mark.parametrize("openclip_name,ours", [("ViT-B-16", "vit_b16"),
                                                ("ViT-L-14-quickgelu", "vit_l14_quickgelu")])
def test_expected_tensors_are_openclips(openclip_name, ours):
    logging.getLogger().setLevel(logging.ERROR)
    reference = open_clip.create_model(openclip_name, pretrained=None, device="meta")
    assert openclip_shapes(MODEL_CONFIGS[ours]()) == {
        k: tuple(v.shape) for k, v in reference.state_dict().items()}


@pytest.mark.parametrize("ours", ["tiny", "rn50", "vit_s32"])
def test_other_models_have_no_openclip_layout(ours):
    with pytest.raises(ValueError, match="no OpenAI/OpenCLIP layout"):
        architecture_of(MODEL_CONFIGS[ours]())


def test_activation_must_agree_between_towers():
    cfg = MODEL_CONFIGS["vit_b32"]()
    cfg.text.activation = "quick_gelu"
    with pytest.raises(ValueError, match="one activation for both towers"):
        architecture_of(cfg)


def test_eval_transform_is_openclips_preprocessing():
    """Resize the shorter side (bicubic) to 224, centre crop, OpenAI's mean/std: bit for bit."""
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    rng = np.random.default_rng(0)
    for size in [(32, 32), (97, 61), (300, 500)]:
        image = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        assert torch.equal(build_eval_transform(224)(image), preprocess(image))
