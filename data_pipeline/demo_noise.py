"""Web-like noise for the demo corpus (`--noise`): the truth of each planted row is recorded.

A scraped pool holds duplicates, re-uploads, captions that belong to another image, other
languages, boilerplate alt-text and copies of benchmark images; curation exists to remove them
(`data_pipeline.curate`). With `--noise`, the train split gets such rows on top of its clean
ones, at the rates below, and OUTPUT/noise.json says which URL is which kind (and what it
copies), so a benchmark can score each filter's precision and recall against the truth. The
clean rows are unchanged: a noisy pool is the clean corpus plus the noise.

In a noisy pool every image (train, val, heldout) has a smooth random colour field on its
background (the shapes stay flat: shape_rendering). Flat renders of the same scene differ only
by a little jitter, so ~20% of the clean corpus's images have a *natural* near duplicate (16x16
pixel cosine >= 0.98) and the planted copies could not be told from them; with the field
(amplitude 60 of 255), the closest of 3,000 distinct renders were at 0.954 (2 of them >= 0.95,
99.9% below 0.944), while the planted variants stayed at >= 0.955 (crop), 0.996 (JPEG 50) and
0.998 (resize), measured here.

Rates are of the clean train rows. They are illustrative, not measured on LAION: DataComp's
pool and LAION-2B are known to hold duplicates at the percent level (Webster et al. 2023 found
~30% near duplicates in LAION-2B by their criterion), so every kind is planted at a level a
filter has to be good to clear.
"""

from __future__ import annotations

import random
from dataclasses import replace

from data_pipeline.captions import write_caption
from data_pipeline.demo_corpus import TRAIN_COMBOS, DemoConfig, PlannedRow, _random_scene, plan_split

NOISE_RATES: dict[str, float] = {
    "exact_duplicate": 0.02,  # the same image again (identical bytes), with its own caption
    "near_duplicate": 0.02,  # re-encoded, resized or slightly cropped copy of a train image
    # Another image's caption: the commonest fault of scraped alt-text. Planted at 40% of the
    # clean rows (27% of the pool), because a web pool is mostly weakly aligned: DataComp's best
    # CLIP-score baseline keeps only the top 30% of its pool (Gadre et al. 2023), LAION-400M
    # kept ~10% of Common Crawl's pairs at cosine 0.3 (Schuhmann et al. 2021). At 5% the raw
    # pool trained as well as the curated one (bench/curation.md, 2026-12-02).
    "mismatched_caption": 0.40,
    "other_language": 0.02,  # a German, French or Spanish caption
    "boilerplate": 0.02,  # file names, download prompts, placeholders
    "contamination": 0.01,  # a re-encoded copy of a val or heldout image
}
# How a near duplicate differs from its source (applied to the served file; shape_rendering).
VARIANTS: tuple[str, ...] = ("jpeg50", "resize80", "crop4")

_WORDS = {
    "de": {"red": "roter", "orange": "oranger", "yellow": "gelber", "green": "grüner", "blue": "blauer",
           "purple": "violetter", "pink": "rosa", "white": "weißer", "circle": "Kreis",
           "square": "Quadrat", "triangle": "Dreieck", "star": "Stern", "diamond": "Raute",
           "cross": "Kreuz", "black": "schwarzem", "gray": "grauem"},
    "fr": {"red": "rouge", "orange": "orange", "yellow": "jaune", "green": "vert", "blue": "bleu",
           "purple": "violet", "pink": "rose", "white": "blanc", "circle": "cercle",
           "square": "carré", "triangle": "triangle", "star": "étoile", "diamond": "losange",
           "cross": "croix", "black": "noir", "gray": "gris"},
    "es": {"red": "rojo", "orange": "naranja", "yellow": "amarillo", "green": "verde", "blue": "azul",
           "purple": "morado", "pink": "rosa", "white": "blanco", "circle": "círculo",
           "square": "cuadrado", "triangle": "triángulo", "star": "estrella", "diamond": "rombo",
           "cross": "cruz", "black": "negro", "gray": "gris"},
}
_LANGUAGE_TEMPLATES = {
    "de": "ein Bild mit einem {colour} {shape} auf einem Hintergrund in der Farbe {background}",
    "fr": "une image d'un {shape} {colour} sur un fond {background}, au milieu de la photo",
    "es": "una imagen de un {shape} {colour} sobre un fondo {background} en el centro de la foto",
}
_BOILERPLATE = ("IMG_{n:04d}.jpg", "DSC{n:05d}", "click here to download", "image not found",
                "no image available", "download free stock photo {n}", "Screenshot {n}.png",
                "sale sale sale sale sale")


def _foreign_caption(rng: random.Random, scene: dict) -> tuple[str, str]:
    language = rng.choice(sorted(_LANGUAGE_TEMPLATES))
    words = _WORDS[language]
    caption = _LANGUAGE_TEMPLATES[language].format(
        colour=words[str(scene["colour"])], shape=words[str(scene["shape"])],
        background=words.get(str(scene["background"]), str(scene["background"])))
    return caption, language


def plan_noise(clean: list[PlannedRow], eval_rows: list[PlannedRow], seed: int
               ) -> tuple[list[PlannedRow], dict[str, dict]]:
    """Noise rows for a train split of `clean` rows (faults excluded), and their truth by file
    name: {"kind": ..., "of": file copied or None, ...}."""
    rng = random.Random(f"{seed}:noise")
    good = [r for r in clean if not r.fault]
    rows, truth = [], {}
    for kind, rate in NOISE_RATES.items():
        for index in range(max(1, round(rate * len(good)))):
            name = f"train_{kind}_{index:05d}.jpg"
            info: dict = {"kind": kind, "of": None}
            if kind in ("exact_duplicate", "near_duplicate", "contamination"):
                pool = eval_rows if kind == "contamination" else good
                source = rng.choice(pool)
                scene = source.attributes()
                variant = "jpeg50" if kind == "contamination" else (
                    rng.choice(VARIANTS) if kind == "near_duplicate" else "")
                row = replace(source, file_name=name, caption=write_caption(rng, scene), variant=variant)
                info.update(of=source.file_name, variant=variant or None)
            else:
                colour, shape = rng.choice(TRAIN_COMBOS)
                scene = _random_scene(rng, colour, shape)
                if kind == "mismatched_caption":
                    other = _random_scene(rng, *rng.choice([c for c in TRAIN_COMBOS
                                                            if c[0] != colour and c[1] != shape]))
                    caption = write_caption(rng, other)
                elif kind == "other_language":
                    caption, info["language"] = _foreign_caption(rng, scene)
                else:
                    caption = rng.choice(_BOILERPLATE).format(n=rng.randrange(10_000))
                row = PlannedRow(file_name=name, caption=caption, render_seed=f"{seed}:noise:{kind}:{index}",
                                 texture=True, **scene)  # type: ignore[arg-type]
            rows.append(replace(row, noise=kind))
            truth[name] = info
    return rows, truth


def _eval_rows(config: DemoConfig) -> list[PlannedRow]:
    return [r for split in ("val", "heldout") for r in plan_split(config, split) if not r.fault]


def plan_pool(config: DemoConfig, split: str) -> list[PlannedRow]:
    """plan_split's rows, and for a noisy config's train split the noise rows among them. The
    noise goes in with its own generator, after the planted faults, so the clean rows and
    faults are exactly those of the clean corpus."""
    rows = plan_split(config, split)
    if split != "train" or not config.noise:
        return rows
    noise_rows, _ = plan_noise(rows, _eval_rows(config), config.seed)
    positions = random.Random(f"{config.seed}:{split}:noise positions")
    for row in noise_rows:
        rows.insert(positions.randrange(len(rows) + 1), row)
    return rows


def noise_truth(config: DemoConfig) -> dict:
    """noise.json: the planted rows' kinds by file name (the URL's last part; the shards'
    parquet maps URLs to keys), and the rates they were planted at."""
    clean = plan_split(config, "train")
    _, truth = plan_noise(clean, _eval_rows(config), config.seed)
    return {"rates": NOISE_RATES, "clean_train_rows": sum(1 for r in clean if not r.fault), "rows": truth}
