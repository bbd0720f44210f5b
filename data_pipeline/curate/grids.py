"""Image grids of what each step removed: people want to see what was thrown away."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw

from data_pipeline.shard_format import BadSample, decode_image, read_shard

TILE = 128
TEXT_LINES = 3


def _images(rows: pd.DataFrame) -> dict[tuple[str, str], Image.Image]:
    wanted = set(zip(rows["shard"], rows["key"]))
    found = {}
    for url in dict.fromkeys(rows["shard"]):
        for raw in read_shard(url):
            if (url, raw.get("__key__")) in wanted and not raw.get("__error__"):
                try:
                    found[(url, raw["__key__"])] = decode_image(raw)
                except BadSample:
                    continue
    return found


def save_grid(rows: pd.DataFrame, path: Path, columns: int = 4) -> None:
    """rows: shard, key, caption, reason; the first len(rows) are drawn with their reason."""
    images = _images(rows)
    n = len(rows)
    cell_h = TILE + 12 * TEXT_LINES + 4
    grid = Image.new("RGB", (columns * TILE, -(-n // columns) * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(rows.itertuples()):
        x, y = (i % columns) * TILE, (i // columns) * cell_h
        image = images.get((row.shard, row.key))
        if image is not None:
            grid.paste(image.resize((TILE, TILE)), (x, y))
        text = textwrap.wrap(f"{row.reason}: {row.caption}", width=TILE // 6)[:TEXT_LINES]
        for j, line in enumerate(text):
            draw.text((x + 2, y + TILE + 2 + 12 * j), line, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, quality=90)
