"""Load an OpenAI CLIP or OpenCLIP checkpoint from a local file into our CLIP.

    trained = import_pretrained("ViT-B-32.pt", "vit_b32_quickgelu", "bpe_simple_vocab_16e6.txt.gz")
    trained.model.encode_image(...)   # a training.model.trained.TrainedModel, as eval jobs use

Files it reads (the layout of training.interop.openclip_layout):
    OpenAI's released `ViT-B-32.pt` etc.    TorchScript archives (fp16 weights; loading one runs
                                            its code, as OpenAI's own loader does: use the
                                            official files)
    OpenCLIP `.bin` / `.pt` / `.pth`        a state dict, or a training checkpoint holding one
                                            under "state_dict" (with DDP's "module." prefix)
    OpenCLIP `.safetensors`

The load is strict: the file must hold exactly the tensors the chosen config has, with the same
shapes, or it fails with one line naming the first mismatches. Never a partial load, and never
timm's silent resizing of position or patch embeddings. Weights are cast to fp32.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from data_pipeline.errors import UserError
from training.interop.openclip_layout import (
    OPENAI_METADATA_KEYS,
    architecture_of,
    text_from_openclip,
    to_openclip_state_dict,
)
from training.model import CLIP, MODEL_CONFIGS, ClipModelConfig, build_model, with_tokenizer
from training.model.image_tower import trunk_checkpoint_filter
from training.model.openclip_json import from_openclip_config, read_openclip_config
from training.text.tokenizer import Tokenizer
from training.model.trained import TrainedModel

# How many mismatches the error line names before "(+N more)".
_SHOWN_MISMATCHES = 4


def import_pretrained(
    path: str | Path, model_name: str, bpe_path: str | Path, device: str | torch.device = "cpu"
) -> TrainedModel:
    """An OpenAI/OpenCLIP checkpoint file as our model, with CLIP's tokenizer from `bpe_path`
    (OpenAI's bpe_simple_vocab_16e6.txt.gz, or a folder with HF's vocab.json + merges.txt)."""
    path = Path(path)
    architecture = model_config(model_name)
    tokenizer = load_clip_tokenizer(bpe_path)
    cfg = with_tokenizer(architecture, tokenizer)
    try:
        architecture_of(cfg)
    except ValueError as err:
        raise UserError(f"--model {model_name}: {err}") from None
    state_dict = read_state_dict(path)
    source = f"{path} (for --model {model_name})"
    # A mismatch is found on a weightless (meta-device) model, before building the real one.
    check_layout(state_dict, openclip_shapes(cfg), source)
    model = build_model(cfg)
    _copy_into(model, state_dict)
    model.to(device).eval()
    return TrainedModel(
        model=model, tokenizer=tokenizer, model_config=cfg, step=0,
        image_size=cfg.vision.image_size, path=path,
    )


def check_model_name(model_name: str) -> None:
    """Fail early, in one line, on a --model that `model_config` would refuse."""
    model_config(model_name)


def model_config(model_name: str) -> ClipModelConfig:
    """A preset name, or an OpenCLIP model-config JSON (the file a custom architecture was
    trained from with open_clip_train); anything else is one line."""
    if not model_name.endswith(".json"):
        if model_name not in MODEL_CONFIGS:
            raise UserError(f"--model {model_name!r} unknown; choose from "
                            f"{', '.join(MODEL_CONFIGS)}, or give an OpenCLIP model-config .json")
        return MODEL_CONFIGS[model_name]()
    try:
        return from_openclip_config(read_openclip_config(model_name, "--model"), model_name)
    except ValueError as err:  # OpenClipConfigError and a bad file are both one line
        raise UserError(str(err) if str(err).startswith("--model") else f"--model {err}") from None


def load_clip_tokenizer(bpe_path: str | Path) -> Tokenizer:
    bpe_path = Path(bpe_path)
    if not bpe_path.exists():
        raise UserError(f"--bpe {bpe_path}: no such file; give OpenAI's "
                        "bpe_simple_vocab_16e6.txt.gz or a folder with vocab.json and merges.txt")
    try:
        return Tokenizer.from_clip_bpe(bpe_path)
    except (OSError, ValueError) as err:
        raise UserError(f"--bpe {bpe_path}: not a CLIP BPE file ({err})") from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The OpenCLIP-layout weights in `path`, fp32, whatever container they come in."""
    if not path.is_file():
        raise UserError(f"--pretrained {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded = load_file(str(path))
        elif _is_torchscript(path):
            # OpenAI released traced models; the weights are the archive's state dict.
            loaded = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any reader failure means: not a checkpoint we can read
        first_line = (str(err).splitlines() or [""])[0]
        raise UserError(f"--pretrained {path}: cannot read it as a checkpoint "
                        f"({type(err).__name__}: {first_line})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"--pretrained {path}: holds a {type(loaded).__name__}, not a state dict")
    if "format_version" in loaded and "model" in loaded:
        raise UserError(f"--pretrained {path}: this is a clipstream checkpoint; pass it with "
                        "--checkpoint instead")
    state_dict = loaded.get("state_dict", loaded)  # an OpenCLIP training checkpoint
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}  # saved under DDP
    return {
        k: v.float() if v.is_floating_point() else v
        for k, v in state_dict.items()
        if k not in OPENAI_METADATA_KEYS and isinstance(v, torch.Tensor)
    }


def openclip_shapes(cfg: ClipModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor an OpenCLIP checkpoint of `cfg` holds."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = build_model(cfg)
    return {k: tuple(v.shape) for k, v in to_openclip_state_dict(model).items()}


def load_openclip_state_dict(model: CLIP, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Copy an OpenCLIP-layout state dict into `model`, after checking it matches exactly."""
    check_layout(state_dict, openclip_shapes(model.cfg), source)
    _copy_into(model, state_dict)


def _copy_into(model: CLIP, state_dict: dict[str, torch.Tensor]) -> None:
    visual = {k: v for k, v in state_dict.items() if k.startswith("visual.") and k != "visual.proj"}
    # timm's converter for OpenAI-CLIP ViTs renames the trunk's tensors (and would turn
    # visual.proj into a classifier head, which our headless trunk does not have).
    trunk = model.visual.trunk
    trunk_weights = trunk_checkpoint_filter(trunk)(visual, trunk)
    ours = {f"visual.trunk.{k}": v for k, v in trunk_weights.items()}
    ours["visual.proj.weight"] = state_dict["visual.proj"].T
    ours.update(text_from_openclip(state_dict))
    # Shapes and names were checked above, so a failure here is a bug in the mapping: strict.
    model.load_state_dict(ours, strict=True)


def check_layout(
    state_dict: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], source: str
) -> None:
    """UserError naming the first missing, unexpected or wrongly shaped tensors, if any."""
    problems = []
    for key, shape in expected.items():
        if key not in state_dict:
            problems.append(f"missing {key} {list(shape)}")
        elif tuple(state_dict[key].shape) != shape:
            problems.append(f"{key} is {list(state_dict[key].shape)}, expected {list(shape)}")
    problems += [
        f"unexpected {k} {list(v.shape)}" for k, v in state_dict.items() if k not in expected
    ]
    if problems:
        more = len(problems) - _SHOWN_MISMATCHES
        shown = "; ".join(problems[:_SHOWN_MISMATCHES]) + (f" (+{more} more)" if more > 0 else "")
        raise UserError(f"{source}: checkpoint does not match the model: {shown}")


def _is_torchscript(path: Path) -> bool:
    # torch.jit.save writes a zip whose records include code/ and constants.pkl; torch.save's
    # zips have neither.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())
