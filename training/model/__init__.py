"""CLIP model: configs, the two towers, and the model that joins them."""

from training.model.clip import (
    CLIP,
    MAX_LOGIT_SCALE,
    build_model,
    no_weight_decay_names,
    param_groups_for_weight_decay,
)
from training.model.configs import (
    MODEL_CONFIGS,
    ClipModelConfig,
    TextConfig,
    VisionConfig,
    for_siglip,
    with_tokenizer,
)

__all__ = [
    "CLIP",
    "MAX_LOGIT_SCALE",
    "MODEL_CONFIGS",
    "ClipModelConfig",
    "TextConfig",
    "VisionConfig",
    "build_model",
    "for_siglip",
    "no_weight_decay_names",
    "param_groups_for_weight_decay",
    "with_tokenizer",
]
