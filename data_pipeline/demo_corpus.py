"""The offline demo corpus: what its images show, which combinations are held out, how it splits.

Every image shows one, two or three identical shapes of one colour on a plain background. The
caption names the colour and the shape (always) plus some of count, size, position and
background, in varied phrasings, so a tiny CLIP has to bind colour to shape to match them.

Generalisation check: the colour x shape pairs in `HELD_OUT` never appear in `train` or `val`;
they make up the `heldout` split, so a zero-shot classifier over all colour x shape classes can
be scored on combinations the model has only seen as separate words. Every colour and every shape
still appears in training with other partners (checked at import time below).

Everything here is a pure function of (seed, sizes): a rerun with the same options plans the same
rows in the same order, which is what lets `--incremental` skip finished shards.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from itertools import product

from data_pipeline.captions import write_caption
from data_pipeline.errors import UserError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 225),
    "purple": (135, 55, 185),
    "pink": (245, 125, 185),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (18, 18, 18),
    "gray": (128, 128, 128),
    "white": (245, 245, 245),
    "blue": (40, 80, 225),
    "green": (40, 165, 60),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("center", "top", "bottom", "left", "right")
COUNTS: tuple[int, ...] = (1, 2, 3)

# 8 of the 48 colour x shape pairs (17%): one per colour, spread over the shapes, so every colour
# keeps 5 shapes and every shape keeps at least 6 colours in training.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "triangle"),
        ("orange", "star"),
        ("yellow", "circle"),
        ("green", "diamond"),
        ("blue", "cross"),
        ("purple", "square"),
        ("pink", "triangle"),
        ("white", "star"),
    }
)

ALL_COMBOS: tuple[tuple[str, str], ...] = tuple(product(COLOURS, SHAPES))
TRAIN_COMBOS: tuple[tuple[str, str], ...] = tuple(c for c in ALL_COMBOS if c not in HELD_OUT)
HELD_OUT_COMBOS: tuple[tuple[str, str], ...] = tuple(c for c in ALL_COMBOS if c in HELD_OUT)

SPLITS: tuple[str, ...] = ("train", "val", "heldout")
# Attribute columns of the URL list, kept by img2dataset (save_additional_columns) so each
# sample's .json says what the image shows.
ATTRIBUTE_COLUMNS: tuple[str, ...] = ("colour", "shape", "size", "count", "position", "background")
# Kinds of rows planted so that failure accounting is exercised on every run.
FAULT_KINDS: tuple[str, ...] = ("dead_url", "not_an_image", "truncated_image")


def _check_held_out_leaves_every_word_in_training() -> None:
    unknown = {c for c in HELD_OUT if c not in ALL_COMBOS}
    assert not unknown, f"HELD_OUT names unknown combinations {sorted(unknown)}"
    assert {c for c, _ in TRAIN_COMBOS} == set(COLOURS), "a colour appears only in held-out pairs"
    assert {s for _, s in TRAIN_COMBOS} == set(SHAPES), "a shape appears only in held-out pairs"


_check_held_out_leaves_every_word_in_training()


@dataclass(frozen=True)
class DemoConfig:
    """Size and randomness of the demo corpus; `num_samples` counts good training pairs."""

    num_samples: int = 20_000
    seed: int = 0
    render_size: int = 128  # source images; img2dataset then resizes to --image-size
    val_samples: int | None = None  # default: max(64, num_samples // 20)
    heldout_samples: int | None = None  # default: max(64, num_samples // 20)
    noise: bool = False  # a noisy pool: demo_noise.plan_pool adds the noise rows to train
    # Draw every image over a random colour field (see demo_noise for why). None = as `noise`:
    # a noisy pool is textured; a trusted seed set for curating it asks for texture alone, so
    # the filter model trains on images that look like the pool's.
    texture: bool | None = None

    @property
    def textured(self) -> bool:
        return self.noise if self.texture is None else self.texture

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise UserError(f"--num-samples must be at least 1, got {self.num_samples}")
        if not 32 <= self.render_size <= 1024:
            raise UserError(f"--render-size must be within 32..1024, got {self.render_size}")
        for name in ("val_samples", "heldout_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")

    def split_size(self, split: str) -> int:
        default = max(64, self.num_samples // 20)
        return {
            "train": self.num_samples,
            "val": self.val_samples or default,
            "heldout": self.heldout_samples or default,
        }[split]


@dataclass(frozen=True)
class PlannedRow:
    """One row of a demo URL list. `fault` is empty for a good image."""

    file_name: str
    caption: str
    colour: str
    shape: str
    size: str
    count: int
    position: str
    background: str
    fault: str = ""
    render_seed: str = ""
    noise: str = ""  # a planted web-noise row (demo_noise), empty for a clean one
    variant: str = ""  # how the served file differs from the render (demo_noise.VARIANTS)
    texture: bool = False  # draw over a random colour field (noisy pools: see demo_noise)

    def attributes(self) -> dict[str, str | int]:
        return {name: getattr(self, name) for name in ATTRIBUTE_COLUMNS}


def fault_counts(rows: int) -> dict[str, int]:
    """How many rows of each fault kind a split of `rows` good images gets (about 1%)."""
    return {
        "dead_url": max(2, rows // 200),
        "not_an_image": max(1, rows // 400),
        "truncated_image": max(1, rows // 400),
    }


def _random_scene(rng: random.Random, colour: str, shape: str) -> dict[str, str | int]:
    background = rng.choice([b for b in BACKGROUNDS if b != colour])
    return {
        "colour": colour,
        "shape": shape,
        "size": rng.choice(SIZES),
        "count": rng.choice(COUNTS),
        "position": rng.choice(POSITIONS),
        "background": background,
    }


def plan_split(config: DemoConfig, split: str) -> list[PlannedRow]:
    """The rows of one split's URL list, in download order (deterministic in config.seed)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    rng = random.Random(f"{config.seed}:{split}")
    combos = HELD_OUT_COMBOS if split == "heldout" else TRAIN_COMBOS
    good = config.split_size(split)
    # Cycle through the pairs so every class is (nearly) equally frequent: zero-shot accuracy
    # per class is then comparable, and no pair is missing from a small split by chance.
    cycle = [combos[i % len(combos)] for i in range(good)]
    rng.shuffle(cycle)
    rows: list[PlannedRow] = []
    for index, (colour, shape) in enumerate(cycle):
        scene = _random_scene(rng, colour, shape)
        rows.append(
            PlannedRow(
                file_name=f"{split}_{index:06d}.jpg",
                caption=write_caption(rng, scene),
                render_seed=f"{config.seed}:{split}:{index}",
                texture=config.textured,
                **scene,  # type: ignore[arg-type]
            )
        )
    faults = [kind for kind, n in fault_counts(good).items() for _ in range(n)]
    for index, kind in enumerate(faults):
        colour, shape = rng.choice(combos)
        scene = _random_scene(rng, colour, shape)
        planted = PlannedRow(
            file_name=f"{split}_{kind}_{index:04d}.jpg",
            caption=write_caption(rng, scene),
            fault=kind,
            **scene,  # type: ignore[arg-type]
        )
        rows.insert(rng.randrange(len(rows) + 1), planted)
    return rows


def class_name(colour: str, shape: str) -> str:
    return f"{colour} {shape}"


def corpus_description(config: DemoConfig, image_size: int, split_rows: dict[str, int]) -> dict:
    """The content of OUTPUT/corpus.json: what the later zero-shot evaluation needs to know."""
    return {
        "format_version": 1,
        "generator": {**dataclasses.asdict(config), "image_size": image_size},
        "vocabulary": {
            "colour": list(COLOURS),
            "shape": list(SHAPES),
            "size": list(SIZES),
            "count": list(COUNTS),
            "position": list(POSITIONS),
            "background": list(BACKGROUNDS),
        },
        "held_out": [list(c) for c in HELD_OUT_COMBOS],
        # Classes for zero-shot classification over colour x shape, in a fixed order.
        "classes": [
            {"name": class_name(c, s), "colour": c, "shape": s, "held_out": (c, s) in HELD_OUT}
            for c, s in ALL_COMBOS
        ],
        "prompt_templates": ["a photo of a {}.", "a {}.", "a drawing of a {}.", "{}"],
        "splits": {
            split: {
                "folder": split,
                "good_rows": config.split_size(split),
                "url_rows": split_rows[split],
                "planted_faults": fault_counts(config.split_size(split)),
                "combos": "held_out" if split == "heldout" else "train",
            }
            for split in SPLITS
        },
    }
