"""Importing OpenCLIP / OpenAI checkpoints: same embeddings and logits as OpenCLIP, every file
format, strict one-line failure on a mismatch.

The reference is a randomly initialised OpenCLIP model (open_clip.create_model(name,
pretrained=None)) saved to disk: imported into our model, it must embed the same images and
texts as OpenCLIP itself, in fp32.
"""

from __future__ import annotations

import subprocess
import sys

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from data_pipeline.errors import UserError
from training.interop.import_checkpoint import check_layout, import_pretrained, read_state_dict
from training.interop.openclip_layout import to_openclip_state_dict
from training.model import MAX_LOGIT_SCALE
from training.text.tokenizer import Tokenizer

from test_interop_layout import CLIP_BPE, openclip_reference

TEXTS = ["a photo of a cat.", "a blurry photo of the big dog!", "an origami airplane",
         "Two  RED circles, on a green background"]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize(
    "openclip_name,ours,container",
    [("ViT-B-32", "vit_b32", "bin"), ("ViT-B-32-quickgelu", "vit_b32_quickgelu", "safetensors")],
)
def test_imported_model_embeds_like_openclip(tmp_path, openclip_name, ours, container):
    ref = openclip_reference(openclip_name)
    path = tmp_path / f"model.{container}"
    if container == "safetensors":
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    else:
        torch.save(ref.state_dict(), path)

    trained = import_pretrained(path, ours, CLIP_BPE)

    torch.manual_seed(1)
    images = torch.randn(3, 3, 224, 224)
    ref_tokens = open_clip.get_tokenizer(openclip_name)(TEXTS)  # padded to 77
    our_tokens = trained.tokenizer(TEXTS)  # padded to the longest caption only
    assert torch.equal(our_tokens, ref_tokens[:, : our_tokens.shape[1]])
    with torch.no_grad():
        ref_image, ref_text, ref_scale = ref(images, ref_tokens)
        out = trained.model(images, our_tokens)
        ref_raw = ref.encode_image(images)
        our_raw = trained.model.encode_image(images, normalize=False)
    ref_logits = ref_scale * ref_image @ ref_text.T
    our_logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    torch.testing.assert_close(out["image_features"], ref_image, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["text_features"], ref_text, rtol=0, atol=1e-5)
    torch.testing.assert_close(our_raw, ref_raw, rtol=0, atol=1e-4)
    torch.testing.assert_close(out["logit_scale"], ref_scale)  # below the cap of 100
    torch.testing.assert_close(our_logits, ref_logits, rtol=0, atol=1e-4)
    print(f"\n{openclip_name}: max |diff| image emb "
          f"{_max_diff(out['image_features'], ref_image):.2e}, "
          f"text emb {_max_diff(out['text_features'], ref_text):.2e}, "
          f"unnormalised image {_max_diff(our_raw, ref_raw):.2e}, "
          f"logits {_max_diff(our_logits, ref_logits):.2e}")
    # and what we import is exactly what was saved (the mapping back reproduces every tensor)
    ours_as_openclip = to_openclip_state_dict(trained.model)
    assert all(torch.equal(ours_as_openclip[k], v) for k, v in ref.state_dict().items())


def test_openclip_training_checkpoint_and_openai_torchscript(tmp_path):
    """OpenCLIP's training checkpoints ({"state_dict": ...} with DDP's module. prefix) and
    OpenAI's released TorchScript files (fp16, with metadata entries) give the same weights."""
    ref = openclip_reference("ViT-B-32-quickgelu", seed=2)
    expected = ref.state_dict()
    wrapped = tmp_path / "epoch_32.pt"
    ddp_names = {f"module.{k}": v for k, v in expected.items()}
    torch.save({"epoch": 32, "state_dict": ddp_names}, wrapped)
    assert {k: v.shape for k, v in read_state_dict(wrapped).items()} == {
        k: v.shape for k, v in expected.items()}

    # OpenAI's release: a traced model whose state dict also holds input_resolution,
    # context_length and vocab_size, weights in fp16, the causal mask a constant.
    for key in ("input_resolution", "context_length", "vocab_size"):
        ref.__dict__.pop(key, None)
        ref.register_buffer(key, torch.tensor(77))
    mask = ref._buffers.pop("attn_mask")
    object.__setattr__(ref, "attn_mask", mask)
    example = (torch.randn(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long))
    traced = torch.jit.trace_module(ref, {"forward": example}, check_trace=False).half()
    jit_file = tmp_path / "ViT-B-32.pt"
    torch.jit.save(traced, str(jit_file))

    trained = import_pretrained(jit_file, "vit_b32_quickgelu", CLIP_BPE)
    imported = to_openclip_state_dict(trained.model)
    assert set(imported) == set(expected)
    for key, value in expected.items():
        assert imported[key].dtype == torch.float32
        assert torch.equal(imported[key], value.half().float()), key


def test_mismatched_checkpoint_is_one_line_naming_keys_and_shapes(tmp_path):
    path = tmp_path / "b32.bin"
    torch.save(openclip_reference("ViT-B-32").state_dict(), path)
    with pytest.raises(UserError) as err:
        import_pretrained(path, "vit_b16", CLIP_BPE)
    message = str(err.value)
    assert "\n" not in message
    assert "visual.conv1.weight is [768, 3, 32, 32], expected [768, 3, 16, 16]" in message
    assert "visual.positional_embedding is [50, 768], expected [197, 768]" in message

    # the CLI: `error: ...` on one line, exit status 2, no traceback
    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    for name in ("test_batch", "batches.meta"):
        (cifar / name).write_bytes(b"")
    done = subprocess.run(
        [sys.executable, "-m", "eval.run", "--pretrained", str(path), "--model", "vit_b16",
         "--bpe", str(CLIP_BPE), "--cifar10", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "visual.conv1.weight" in lines[0]


def test_check_layout_reports_missing_unexpected_and_shapes():
    expected = {f"k{i}": (2, 3) for i in range(6)}
    got = {f"k{i}": torch.zeros(2, 3) for i in range(1, 6)}
    got["k5"] = torch.zeros(3, 2)
    got["logit_bias"] = torch.zeros(())
    with pytest.raises(UserError) as err:
        check_layout(got, expected, "x.bin")
    assert str(err.value) == ("x.bin: checkpoint does not match the model: missing k0 [2, 3]; "
                              "k5 is [3, 2], expected [2, 3]; unexpected logit_bias []")
    many = {f"extra{i}": torch.zeros(1) for i in range(7)}
    with pytest.raises(UserError, match=r"\(\+\d+ more\)$"):
        check_layout({**got, **many}, expected, "x.bin")


def test_bad_files_and_options_are_one_line(tmp_path):
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("hello")
    with pytest.raises(UserError, match="cannot read it as a checkpoint"):
        read_state_dict(not_a_checkpoint)
    with pytest.raises(UserError, match="no such file"):
        read_state_dict(tmp_path / "absent.bin")
    with pytest.raises(UserError, match="unknown"):
        import_pretrained(not_a_checkpoint, "vit_b99", CLIP_BPE)
    with pytest.raises(UserError, match="no OpenAI/OpenCLIP layout"):
        import_pretrained(not_a_checkpoint, "vit_s32", CLIP_BPE)
    with pytest.raises(UserError, match="--bpe"):
        import_pretrained(not_a_checkpoint, "vit_b32", tmp_path / "absent.txt.gz")


def test_clip_tokenizer_matches_openclips_on_prompts():
    """Every CIFAR-100 prompt (18 templates x 100 classes) tokenizes to OpenCLIP's ids."""
    import json

    prompts = json.loads(open("eval/templates/cifar100.json", encoding="utf-8").read())
    texts = [t.format(c) for c in prompts["classes"] for t in prompts["templates"]] + TEXTS
    ours = Tokenizer.from_clip_bpe(CLIP_BPE)
    ref = open_clip.get_tokenizer("ViT-B-32")(texts)
    for row, ids in zip(ref.tolist(), ours.encode_batch(texts)):
        assert row[: len(ids)] == ids and not any(row[len(ids):])


def test_logit_scale_cap_matches_openai():
    # OpenAI's released logit_scale is ln(100) stored in fp16 (4.6055): our cap clamps it to
    # exactly 100, 0.03% below OpenCLIP's unclamped exp; no ranking changes.
    assert MAX_LOGIT_SCALE == 100.0


def test_custom_openclip_json_checkpoint_embeds_like_openclip(tmp_path):
    """A model the user trained with open_clip_train from their own model-config JSON (here the
    sample-efficiency bench's small ViT at 64 px) imports by naming that JSON as --model."""
    import json

    arch = {"embed_dim": 128,
            "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "patch_size": 8,
                           "head_width": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4,
                         "layers": 2}}
    config = tmp_path / "my-vit.json"
    config.write_text(json.dumps(arch))
    torch.manual_seed(3)
    ref = open_clip.model.CLIP(arch["embed_dim"], arch["vision_cfg"], arch["text_cfg"]).eval()
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "x", "state_dict": ref.state_dict()}, path)

    trained = import_pretrained(path, str(config), CLIP_BPE)

    assert trained.image_size == 64
    images = torch.randn(3, 3, 64, 64)
    ref_tokens = open_clip.tokenize(TEXTS)
    our_tokens = trained.tokenizer(TEXTS)
    with torch.no_grad():
        ref_image, ref_text, _ = ref(images, ref_tokens)
        out = trained.model(images, our_tokens)
    torch.testing.assert_close(out["image_features"], ref_image, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["text_features"], ref_text, rtol=0, atol=1e-5)
    ours_as_openclip = to_openclip_state_dict(trained.model)
    assert all(torch.equal(ours_as_openclip[k], v) for k, v in ref.state_dict().items())

    # the export writes an OpenCLIP JSON that says the same architecture
    from training.interop.openclip_layout import openclip_model_config

    name, exported = openclip_model_config(trained.model_config)
    assert name == "ViT-2x128-p8-64px" and exported == arch

    with pytest.raises(UserError, match="no file at"):
        import_pretrained(path, str(tmp_path / "missing.json"), CLIP_BPE)
