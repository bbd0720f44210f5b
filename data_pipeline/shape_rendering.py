"""Draw the demo corpus's images with PIL, in parallel, and plant the broken files.

Each image is a pure function of its planned row (the render seed fixes the jitter), so a rerun
draws the same pixels. Sizes and spacings are fractions of the canvas so any render size works;
they are chosen so three large shapes still fit side by side without touching.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import random
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw

from data_pipeline.demo_corpus import BACKGROUNDS, COLOURS, PlannedRow

# Bump when the drawing changes: corpus.json records it, so an incremental rerun refuses to mix
# shards drawn by two versions.
RENDERER_VERSION = 3
RADIUS = {"small": 0.085, "large": 0.14}  # circumradius as a fraction of the canvas side
# Centre-to-centre distance in radii: small shapes get more air, large ones must fit three across.
SPACING = {"small": 2.6, "large": 2.2}
# Where the row (or column) of shapes sits: (axis the shapes line up along, its offset).
LINES = {
    "center": ("horizontal", 0.5),
    "top": ("horizontal", 0.22),
    "bottom": ("horizontal", 0.78),
    "left": ("vertical", 0.22),
    "right": ("vertical", 0.78),
}
JPEG_QUALITY = 92


def _jitter_colour(rng: random.Random, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _ring(count: int, radius: float, start: float) -> list[tuple[float, float]]:
    """`count` points evenly spaced on a circle, the first at angle `start` (radians)."""
    angles = (start + k * 2 * math.pi / count for k in range(count))
    return [(radius * math.cos(a), radius * math.sin(a)) for a in angles]


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a shape of circumradius r, rotated by `angle` radians around its centre."""
    if shape == "square":
        points = _ring(4, r, math.pi / 4)
    elif shape == "diamond":  # narrower than tall, so it never looks like a turned square
        points = [(0.0, -r), (0.62 * r, 0.0), (0.0, r), (-0.62 * r, 0.0)]
    elif shape == "triangle":
        points = [(x, y + 0.15 * r) for x, y in _ring(3, r, -math.pi / 2)]  # centre the visual mass
    elif shape == "star":
        outer, inner = _ring(5, r, -math.pi / 2), _ring(5, 0.45 * r, -math.pi / 2 + math.pi / 5)
        points = [p for pair in zip(outer, inner, strict=True) for p in pair]
    elif shape == "cross":
        w = 0.3 * r
        arm = [(-w, -r), (w, -r), (w, -w)]  # the top arm's end and its corner with the right arm
        points = []
        for _ in range(4):  # the same three points turned by 90 degrees for each arm
            points += arm
            arm = [(-y, x) for x, y in arm]
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    return [(cx + x * cos_a - y * sin_a, cy + x * sin_a + y * cos_a) for x, y in points]


TEXTURE_AMPLITUDE = 60  # of 255: see demo_noise for why and what it measured


def _colour_field(seed: str, size: int) -> Image.Image:
    """A smooth random RGB field (4x4 values, bicubic): structure at every scale, like a photo."""
    rng = random.Random(f"texture:{seed}")
    cells = Image.frombytes("RGB", (4, 4), bytes(rng.randrange(256) for _ in range(48)))
    return cells.resize((size, size), Image.BICUBIC)


def _background(row: PlannedRow, size: int, colour: tuple[int, int, int]) -> Image.Image:
    """The canvas: the background colour, and for a textured row the colour field added to it
    (a shift of up to +-TEXTURE_AMPLITUDE per channel, clipped). Only the background is
    textured: the shapes are drawn over it in their flat colour, so a colour name and a shape's
    outline mean the same as in the flat corpus."""
    image = Image.new("RGB", (size, size), colour)
    if not row.texture:
        return image
    field = _colour_field(row.render_seed or row.file_name, size)
    offset = Image.eval(field, lambda v: max(0, min(255, round((v - 127.5) * TEXTURE_AMPLITUDE / 127.5 + 128))))
    return ImageChops.add(image, offset, scale=1.0, offset=-128)


def render_scene(row: PlannedRow, size: int) -> Image.Image:
    rng = random.Random(row.render_seed or row.file_name)
    image = _background(row, size, _jitter_colour(rng, BACKGROUNDS[row.background], 10))
    draw = ImageDraw.Draw(image)
    fill = _jitter_colour(rng, COLOURS[row.colour], 12)
    radius = RADIUS[row.size] * size * rng.uniform(0.95, 1.05)
    axis, offset = LINES[row.position]
    spacing = SPACING[row.size] * RADIUS[row.size] * size
    # A lone shape may slide further along its line than a group, which would leave the canvas;
    # a centred one stays put, or it would drift into "left" or "right" territory.
    slide = (
        0.0
        if row.position == "center"
        else rng.uniform(-1.0, 1.0) * size * {1: 0.2, 2: 0.1, 3: 0.0}[row.count]
    )
    for i in range(row.count):
        along = 0.5 * size + (i - (row.count - 1) / 2) * spacing + slide + rng.uniform(-0.015, 0.015) * size
        across = offset * size + rng.uniform(-0.03, 0.03) * size
        cx, cy = (along, across) if axis == "horizontal" else (across, along)
        if row.shape == "circle":
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        else:
            angle = math.radians(rng.uniform(-15.0, 15.0))
            draw.polygon(_polygon(row.shape, cx, cy, radius, angle), fill=fill)
    return image


def _encode_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _write_row(row: PlannedRow, folder: Path, size: int) -> None:
    target = folder / row.file_name
    if row.fault == "dead_url":
        return  # nothing on disk: the server answers 404
    if row.fault == "not_an_image":
        # Bytes that no decoder accepts, under a .jpg name, as a misconfigured server would send.
        target.write_bytes(b"<html>not an image</html>" + random.Random(row.file_name).randbytes(1024))
        return
    image = render_scene(row, size)
    quality = JPEG_QUALITY
    if row.variant == "jpeg50":
        quality = 50
    elif row.variant == "resize80":
        image = image.resize((round(size * 0.8),) * 2, Image.BICUBIC)
    elif row.variant == "crop4":  # 2% off each side, back to full size
        cut = round(size * 0.02)
        image = image.crop((cut, cut, size - cut, size - cut)).resize((size, size), Image.BICUBIC)
    data = _encode_jpeg(image, quality)
    if row.fault == "truncated_image":
        data = data[: len(data) // 2]  # an interrupted transfer: header intact, pixels cut off
    target.write_bytes(data)


def _render_chunk(job: tuple[list[PlannedRow], str, int]) -> int:
    rows, folder, size = job
    for row in rows:
        _write_row(row, Path(folder), size)
    return len(rows)


def render_rows(rows: list[PlannedRow], folder: Path, size: int, processes: int) -> None:
    """Write every row's source file into `folder` (dead URLs get none)."""
    folder.mkdir(parents=True, exist_ok=True)
    chunk = max(1, math.ceil(len(rows) / (processes * 8)))
    jobs = [(rows[i : i + chunk], str(folder), size) for i in range(0, len(rows), chunk)]
    if processes <= 1 or len(rows) < 500:  # a pool costs more than it saves on a test-sized split
        for job in jobs:
            _render_chunk(job)
        return
    # fork: workers inherit the imported modules, so the pool starts in milliseconds. Rendering
    # runs before the loopback server starts, so no thread is alive to be cloned half-way.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(processes) as pool:
        for _ in pool.imap_unordered(_render_chunk, jobs):
            pass
