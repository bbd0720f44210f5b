"""CLIP model: dynamic text length, towers, locking, patch dropout, temperature, named configs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import timm
import torch

from training.model import (
    MAX_LOGIT_SCALE,
    MODEL_CONFIGS,
    ClipModelConfig,
    TextConfig,
    VisionConfig,
    build_model,
    for_siglip,
    no_weight_decay_names,
    param_groups_for_weight_decay,
    with_tokenizer,
)
from training.text.tokenizer import train_tokenizer

VOCAB, EOT, PAD = 500, 2, 0


def tiny_cfg(**changes) -> ClipModelConfig:
    cfg = MODEL_CONFIGS["tiny"]()
    text = dataclasses.replace(
        cfg.text, vocab_size=VOCAB, eot_id=EOT, pad_id=PAD, context_length=24
    )
    return dataclasses.replace(cfg, text=text, **changes)


def captions_ids(lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Fake tokenized captions: [SOT=1, words..., EOT] with ids that are never EOT/PAD."""
    g = torch.Generator().manual_seed(seed)
    return [[1, *torch.randint(3, VOCAB, (n - 2,), generator=g).tolist(), EOT] for n in lengths]


def pad(seqs: list[list[int]], length: int, fill: int | list[int] = PAD) -> torch.Tensor:
    out = torch.full((len(seqs), length), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s)
        if isinstance(fill, list):
            out[i, len(s) :] = torch.tensor(fill[: length - len(s)])
    return out


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(tiny_cfg()).eval()


def test_dynamic_text_length_equals_full_padding(tiny):
    seqs = captions_ids([4, 9, 13, 2])
    dynamic = pad(seqs, max(map(len, seqs)))  # what the collate produces
    full = pad(seqs, tiny.cfg.text.context_length)
    g = torch.Generator().manual_seed(1)
    garbage = pad(
        seqs,
        tiny.cfg.text.context_length,
        fill=torch.randint(3, VOCAB, (24,), generator=g).tolist(),
    )
    with torch.no_grad():
        a, b, c = (tiny.encode_text(t) for t in (dynamic, full, garbage))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)  # anything after EOT is invisible
    # and each caption alone (its own length) gives the same embedding as inside the batch
    with torch.no_grad():
        alone = torch.cat([tiny.encode_text(pad([s], len(s))) for s in seqs])
    torch.testing.assert_close(alone, a)


def test_text_pools_at_first_eot(tiny):
    seq = captions_ids([6])[0]
    twice = torch.tensor([seq + seq[1:]])  # second EOT later in the row
    with torch.no_grad():
        torch.testing.assert_close(tiny.encode_text(twice), tiny.encode_text(torch.tensor([seq])))


def test_text_longer_than_context_is_rejected(tiny):
    with pytest.raises(ValueError, match="context_length"):
        tiny.encode_text(pad(captions_ids([30]), 30))


def test_forward_shapes_and_temperature(tiny):
    images = torch.randn(3, 3, 64, 64)
    text = pad(captions_ids([5, 7, 3]), 7)
    out = tiny(images, text)
    assert out["image_features"].shape == out["text_features"].shape == (3, 128)
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out["text_features"].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out["logit_scale"], torch.tensor(1 / 0.07))
    assert out["logit_bias"] is None
    assert tiny.encode_image(images, normalize=False).norm(dim=-1).ne(1).any()


def test_logit_scale_is_clamped_at_100():
    model = build_model(tiny_cfg())
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    scale = model(torch.randn(1, 3, 64, 64), pad(captions_ids([4]), 4))["logit_scale"]
    torch.testing.assert_close(scale, torch.tensor(MAX_LOGIT_SCALE))
    scale.backward()
    assert model.logit_scale.grad.item() == 0.0  # no push further up past the cap


def test_siglip_init():
    model = build_model(for_siglip(tiny_cfg()))
    out = model(torch.randn(1, 3, 64, 64), pad(captions_ids([4]), 4))
    torch.testing.assert_close(out["logit_scale"], torch.tensor(10.0))
    torch.testing.assert_close(out["logit_bias"].detach(), torch.tensor(-10.0))
    assert out["logit_bias"].requires_grad


@pytest.mark.parametrize("locked", ["image", "text"])
def test_lock_tower_freezes_and_stays_in_eval(locked):
    model = build_model(tiny_cfg(**{f"lock_{locked}": True}))
    frozen, free = (model.visual, model.text) if locked == "image" else (model.text, model.visual)
    model.train()
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in free.parameters())
    assert not any(m.training for m in frozen.modules())
    assert all(m.training for m in free.modules())
    out = model(torch.randn(2, 3, 64, 64), pad(captions_ids([4, 6]), 6))
    (out["image_features"] * out["text_features"]).sum().backward()
    assert all(p.grad is None for p in frozen.parameters())
    assert all(p.grad is not None for p in free.parameters())
    trainable = {id(p) for g in param_groups_for_weight_decay(model, 0.1) for p in g["params"]}
    assert not trainable & {id(p) for p in frozen.parameters()}


def test_patch_dropout_only_in_training():
    model = build_model(tiny_cfg(vision=dataclasses.replace(tiny_cfg().vision, patch_dropout=0.5)))
    token_counts = []
    model.visual.trunk.blocks[0].register_forward_hook(
        lambda m, i, o: token_counts.append(o.shape[1])
    )
    images = torch.randn(2, 3, 64, 64)
    model.train()
    model.encode_image(images)
    model.eval()
    with torch.no_grad():
        model.encode_image(images)
    patches = (64 // 8) ** 2
    assert token_counts == [1 + patches // 2, 1 + patches]  # CLS always kept


def test_patch_dropout_needs_a_vit():
    with pytest.raises(ValueError, match="patch"):
        build_model(tiny_cfg(vision=VisionConfig("resnet18", 64, patch_dropout=0.5)))


def test_grad_checkpointing_gives_same_outputs_and_grads():
    images, text = torch.randn(2, 3, 64, 64), pad(captions_ids([5, 8]), 8)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(tiny_cfg(grad_checkpointing=checkpointing))
        assert model.text.grad_checkpointing == checkpointing
        out = model(images, text)
        (out["image_features"] @ out["text_features"].T).logsumexp(-1).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_math_attention_equals_fused_attention_values_and_grads():
    # The CPU default ("math") against torch's fused kernel, both towers, fp32.
    images, text = torch.randn(3, 3, 64, 64), pad(captions_ids([5, 8, 3]), 8)
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    results = []
    for fused in (True, False):
        model.set_fused_attention(fused)
        switches = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
        assert len(switches) == 4 + 3 and all(s == fused for s in switches)  # ViT + text blocks
        model.zero_grad()
        out = model(images, text)
        (out["image_features"] @ out["text_features"].T).logsumexp(-1).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (fused_out, fused_grads), (math_out, math_grads) = results
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(math_out[key], fused_out[key])
    for name, grad in fused_grads.items():
        torch.testing.assert_close(math_grads[name], grad, msg=name)


def test_weight_decay_groups(tiny):
    names = no_weight_decay_names(tiny)
    for expected in (
        "logit_scale",
        "text.token_embedding.weight",
        "text.positional_embedding",
        "text.ln_final.weight",
        "text.blocks.0.attn.qkv.bias",
        "visual.trunk.pos_embed",
        "visual.trunk.cls_token",
        "visual.trunk.norm.weight",
    ):
        assert expected in names, expected
    for decayed in (
        "text.blocks.0.attn.qkv.weight",
        "text.proj.weight",
        "visual.proj.weight",
        "visual.trunk.blocks.0.mlp.fc1.weight",
    ):
        assert decayed not in names, decayed
    groups = param_groups_for_weight_decay(tiny, 0.2)
    assert [g["weight_decay"] for g in groups] == [0.2, 0.0]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in tiny.parameters())  # each exactly once

    # the optimizer is built on the bare model; wrappers are the engine's business
    class Wrapper(torch.nn.Module):  # holds the model in `.module`, as DDP does
        def __init__(self, module):
            super().__init__()
            self.module = module

    with pytest.raises(TypeError, match="bare CLIP"):
        no_weight_decay_names(Wrapper(tiny))


def test_pretrained_trunk_weights_from_local_file(tmp_path):
    cfg = tiny_cfg()
    source = timm.create_model(
        cfg.vision.timm_name,
        pretrained=False,
        num_classes=10,
        img_size=64,
        **cfg.vision.timm_kwargs,
    )
    torch.save(
        {"state_dict": source.state_dict()}, tmp_path / "trunk.pth"
    )  # with a classifier head
    vision = dataclasses.replace(cfg.vision, pretrained_path=str(tmp_path / "trunk.pth"))
    model = build_model(dataclasses.replace(cfg, vision=vision))
    loaded = model.visual.trunk.state_dict()
    for name, value in source.state_dict().items():
        if not name.startswith("head."):
            torch.testing.assert_close(loaded[name], value, msg=name)


def test_with_tokenizer_and_real_tokens(tmp_path):
    tok = train_tokenizer(
        ["a red circle", "a blue square", "two green triangles"] * 20,
        300,
        tmp_path / "t.json",
        context_length=16,
    )
    cfg = with_tokenizer(MODEL_CONFIGS["tiny"](), tok)
    assert (cfg.text.vocab_size, cfg.text.eot_id, cfg.text.pad_id) == (
        tok.vocab_size,
        tok.eot_id,
        tok.pad_id,
    )
    model = build_model(cfg).eval()
    texts = ["a red circle", "two green triangles on a blue square"]
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_text(tok(texts)), model.encode_text(tok(texts, pad_to=16))
        )
    long_tok = train_tokenizer(["a b"] * 5, 300, tmp_path / "u.json", context_length=100)
    with pytest.raises(ValueError, match="context_length"):
        with_tokenizer(MODEL_CONFIGS["tiny"](), long_tok)


def test_config_validation_and_round_trip():
    cfg = MODEL_CONFIGS["vit_b32"]()
    assert ClipModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(TypeError):
        ClipModelConfig.from_dict({**cfg.to_dict(), "embed_width": 3})  # unknown keys are errors
    with pytest.raises(ValueError):
        TextConfig(width=100, heads=8)
    with pytest.raises(ValueError):
        TextConfig(vocab_size=100)  # CLIP's EOT id does not fit
    with pytest.raises(ValueError):
        VisionConfig("vit_tiny_patch16_224", 64, patch_dropout=1.0)
    with pytest.raises(ValueError):
        VisionConfig("vit_tiny_patch16_224", 64, timm_kwargs={"num_classes": 5})
    with pytest.raises(ValueError):
        dataclasses.replace(cfg, lock_image=True, lock_text=True)
    edited = MODEL_CONFIGS["tiny"]()
    edited.text.heads = 5  # edited in place: re-running the parent's check covers the children
    with pytest.raises(ValueError, match="heads"):
        edited.__post_init__()


# Each named config builds and runs one 1-sample batch at its real resolution (~30 s for the
# base-size ones; each ViT-L/14 alone takes ~15-20 s on 2 cores).
@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.slow) if name.startswith("vit_l14") else name
    for name in sorted(MODEL_CONFIGS)
])
def test_named_configs_build_and_run(name):
    cfg = MODEL_CONFIGS[name]()
    model = build_model(cfg).eval()
    size = cfg.vision.image_size
    with torch.no_grad():
        out = model(
            torch.randn(1, 3, size, size), torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407]])
        )
    assert out["image_features"].shape == out["text_features"].shape == (1, cfg.embed_dim)
    assert (
        torch.isfinite(out["image_features"]).all() and torch.isfinite(out["text_features"]).all()
    )


def test_quickgelu_configs_use_quickgelu_in_both_towers():
    cfg = MODEL_CONFIGS["vit_b32_quickgelu"]()
    assert cfg.text.activation == "quick_gelu"
    assert cfg.vision.timm_name == "vit_base_patch32_clip_quickgelu_224"
    small = tiny_cfg()
    quick_text = dataclasses.replace(small.text, activation="quick_gelu")
    small = dataclasses.replace(small, text=quick_text)
    act = build_model(small).text.blocks[0].mlp[1]
    x = torch.linspace(-4, 4, 101)
    torch.testing.assert_close(act(x), x * torch.sigmoid(1.702 * x))  # OpenAI's formula
    assert (act(x) - torch.nn.functional.gelu(x)).abs().max() > 1e-2  # not GELU
    with pytest.raises(ValueError, match="activation"):
        TextConfig(activation="relu")


def test_configs_saved_before_the_activation_field_still_load():
    saved = MODEL_CONFIGS["vit_b32"]().to_dict()
    del saved["text"]["activation"]  # what an older checkpoint holds
    assert ClipModelConfig.from_dict(saved).text.activation == "gelu"
