"""The webdataset shard format, read back: one module that every reader of shards uses.

A shard is a tar whose members are grouped into samples by key (the path minus all extensions):
img2dataset writes ``KEY.jpg`` (the image), ``KEY.txt`` (the caption) and ``KEY.json`` (its
metadata); eval sets add ``KEY.cls`` (a class index). This module reads shards into *raw* samples
(dicts of undecoded member bytes keyed by extension, ``{"__key__": "000123", "jpg": b"...",
"txt": b"..."}``) and decides whether a sample is usable and, if not, why. `validate`, the
trainer, eval, search and the tokenizer all read through it, so they can never disagree about
what a good sample is.

Bookkeeping keys of a raw sample:

- ``__url__``: the shard it came from;
- ``__visit__``: a per-reader counter of shard openings, so one shard read twice (resampling,
  wrap-around) is judged per reading;
- ``__visit_total__``: set on the last item of a reading, the number of items that reading gave;
- ``__error__``: with a key, the sample is malformed (a duplicate member); with an empty key, the
  item is no sample but a record that the tar broke (truncated, unreadable, empty). It travels
  through the trainer's shuffle buffer like a sample, so that skip counts and shard judging
  happen at the same stream position in an uninterrupted and in a resumed run;
- ``__unreadable__``: set (True) on such a record when the storage, not the tar, failed: a
  remote object that kept failing to read after every retry (`data_pipeline.object_store`). The
  rest of that shard is skipped and counted, but the shard is not judged a wrong dataset.

Tar parsing is sequential (so pipes and object storage work): ours for plain tars
(`data_pipeline.tar_stream`, for speed and to catch tars cut off at a header), Python's tarfile
for compressed ones; remote URLs (s3://, gs://, ...) are read natively, with retries that resume
mid-object (`data_pipeline.object_store`); `pipe:` opening and key splitting are webdataset's
(`gopen`, `base_plus_ext`).
The grouping is ours, to be independent of webdataset's 0.2.96 format change.
"""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any, BinaryIO, Iterable, Iterator

import fsspec
import numpy as np
import simplejpeg
from PIL import Image
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from data_pipeline.object_store import ReadRetry, ShardUnreadable, is_remote, open_remote
from data_pipeline.tar_stream import read_members

RawSample = dict[str, Any]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSION = "txt"
CLASS_EXTENSION = "cls"
METADATA_EXTENSION = "json"
# No image or caption is this large; a header declaring more is damage (or hostile), and reading
# it whole would exhaust memory before the end of the file is noticed.
MAX_MEMBER_BYTES = 1 << 30
_READ_CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------------
# Reading tars


def is_url(spec: str) -> bool:
    return "://" in spec


def open_binary(url: str, retry: ReadRetry | None = None) -> BinaryIO:
    """A local path, an fsspec URL (s3://, file://, ...) or a `pipe:` command, opened for reading.

    Remote URLs are read natively with retries that resume mid-object
    (`data_pipeline.object_store`; `retry`: how patiently, default `ReadRetry()`)."""
    if url.startswith("pipe:"):
        return gopen(url, "rb")
    if is_remote(url):
        return open_remote(url, retry)
    if is_url(url):
        return fsspec.open(url, "rb").open()
    return open(url, "rb")


def _close_quietly(stream: BinaryIO) -> None:
    # A pipe closed before its command finished makes the command die of SIGPIPE, and webdataset's
    # Pipe.close() then raises; that is expected when we stop reading a shard early.
    try:
        stream.close()
    except Exception:  # noqa: BLE001 - nothing useful can be done with a failing close
        pass


class _CountingReader:
    """Counts the bytes handed to tarfile, to tell a finished tar from one cut off at a header."""

    def __init__(self, stream: BinaryIO, first: bytes = b"") -> None:
        self.stream, self.first, self.bytes_read = stream, first, 0

    def read(self, size: int = -1) -> bytes:
        if self.first:
            data, self.first = (self.first, b"") if size < 0 else (self.first[:size], self.first[size:])
        else:
            data = self.stream.read(size)
        self.bytes_read += len(data)
        return data


# gzip, bzip2, xz: compressed tars go through tarfile, which decompresses streams.
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def _sniff(stream: BinaryIO, size: int) -> bytes:
    """The stream's first `size` bytes (fewer only at its end): enough to tell compression."""
    parts, wanted = [], size
    while wanted > 0:
        chunk = stream.read(wanted)
        if not chunk:
            break
        parts.append(chunk)
        wanted -= len(chunk)
    return b"".join(parts)


def _tar_members(stream: BinaryIO, errors: list[Exception]) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file of a tar stream, read sequentially (works on pipes).

    Plain tars (what img2dataset writes) are read by `tar_stream.read_members`, which is several
    times faster than tarfile and also reports what tarfile lets pass: a tar cut off at (or
    inside) a member header, which tarfile treats as a normal end, silently dropping the rest of
    the shard; a garbled header after the first; a member whose header declares more bytes than
    follow or than any sample has. Compressed tars go through tarfile with the same checks. Any
    error ends the stream (a broken member leaves the tar at an unknown offset) and is appended
    to `errors`, so the sample being grouped is still emitted.
    """
    try:
        head = _sniff(stream, 6)
        if not head.startswith(_COMPRESSED_MAGIC):
            for name, data in read_members(stream, MAX_MEMBER_BYTES, first=head):
                if not name.startswith("__"):  # __*__: webdataset metadata
                    yield name, data
            return
        counted = _CountingReader(stream, head)
        tar = tarfile.open(fileobj=counted, mode="r|*")
        for info in tar:
            if info.isreg() and not info.name.startswith("__"):
                yield info.name, _read_member(tar, info)
            tar.members = []  # stream mode keeps every TarInfo otherwise: memory grows per member
    except Exception as exn:  # noqa: BLE001 - truncated/garbled tar, gzip or network errors
        errors.append(exn)


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    if info.size > MAX_MEMBER_BYTES:
        raise tarfile.ReadError(f"member {info.name} declares {info.size} bytes (corrupt header?)")
    handle = tar.extractfile(info)
    chunks, remaining = [], info.size
    while remaining > 0:
        chunk = handle.read(min(remaining, _READ_CHUNK))
        if not chunk:
            raise tarfile.ReadError(f"member {info.name} is cut short")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _group_members(members: Iterable[tuple[str, bytes]]) -> Iterator[RawSample]:
    """Consecutive tar members with the same key (path minus all extensions) form one sample.

    Our own grouping rather than webdataset's group_by_keys, whose output format changed in
    0.2.96; the key split is still webdataset's base_plus_ext.
    """
    current: RawSample | None = None
    for name, data in members:
        key, ext = base_plus_ext(name)
        if key is None:
            continue
        ext = ext.lower()
        if current is None or key != current["__key__"]:
            if current is not None:
                yield current
            current = {"__key__": key}
        if ext in current:
            current["__error__"] = f"duplicate member {name}"
        current[ext] = data
    if current is not None:
        yield current


def _shard_items(url: str, retry: ReadRetry | None) -> Iterator[RawSample]:
    try:
        stream = open_binary(url, retry)
    except Exception as exn:  # noqa: BLE001 - any failure to open is reported as a broken shard
        yield {"__key__": "", "__error__": f"cannot open shard: {exn!r}",
               **({"__unreadable__": True} if isinstance(exn, ShardUnreadable) else {})}
        return
    errors: list[Exception] = []
    try:
        yield from _group_members(_tar_members(stream, errors))
    finally:
        _close_quietly(stream)
    if errors:
        record = {"__key__": "", "__error__": f"unreadable tar ({type(errors[0]).__name__}: {errors[0]})"}
        if isinstance(errors[0], ShardUnreadable):
            record["__unreadable__"] = True
        yield record


def read_shard(url: str, visit: int = 0, retry: ReadRetry | None = None) -> Iterator[RawSample]:
    """All items of one shard reading, never raising: a broken tar ends with an __error__ item,
    an empty or unreadable one gives a single __error__ item. The last item carries
    ``__visit_total__`` (one-item lookahead) so consumers know when the reading is complete.
    retry: for remote shards, how failed reads are retried before the rest of the shard is
    given up (`data_pipeline.object_store.ReadRetry`; its defaults when None)."""
    previous: RawSample | None = None
    total = 0
    for item in _shard_items(url, retry):
        item["__url__"], item["__visit__"] = url, visit
        total += 1
        if previous is not None:
            yield previous
        previous = item
    if previous is None:
        previous = {"__key__": "", "__error__": "shard has no samples", "__url__": url}
        previous["__visit__"], total = visit, 1
    previous["__visit_total__"] = total
    yield previous


# ---------------------------------------------------------------------------------------------
# Judging and decoding samples


class BadSample(Exception):
    """A raw sample that cannot be used; the reason is counted and logged, never fatal."""


def decode_image(raw: RawSample, min_size: int | None = None) -> Image.Image:
    """min_size: the image may come back smaller, but no side below min_size (JPEG only)."""
    ext = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
    if ext is None:
        raise BadSample(f"no image (members: {member_names(raw)})")
    data = raw[ext]
    try:
        image = Image.open(io.BytesIO(data))
        if min_size is not None:
            # libjpeg scales by 1/2, 1/4 or 1/8 while decoding (in the DCT domain), so a 256-px
            # JPEG headed for a 64-px crop is decoded at 128 px for a fraction of the work,
            # instead of decoding every pixel and discarding most of them in the resize.
            # A no-op for other formats and when no scale keeps both sides >= min_size.
            image.draft("RGB", (min_size, min_size))
        image.load()  # decode now, so a truncated/corrupt file fails here and not in a transform
        return image.convert("RGB")
    except Exception as exn:  # noqa: BLE001 - PIL raises many types (OSError, ValueError, ...)
        raise BadSample(f"{ext}: image does not decode ({type(exn).__name__}: {exn})") from None


# JPEG's start-of-image marker: the bytes that decode_pixels sends to libjpeg-turbo directly.
_JPEG_MAGIC = b"\xff\xd8"
# Ink-based JPEGs, which libjpeg-turbo turns into RGB one level off PIL's own conversion.
_PIL_COLORSPACES = ("CMYK", "YCCK")


def decode_pixels(raw: RawSample, min_size: int | None = None) -> np.ndarray:
    """The image as RGB uint8 pixels [H, W, 3], the same pixels `decode_image` gives.

    JPEGs go straight to libjpeg-turbo (simplejpeg): 0.10-0.15 ms per 256-px image against
    0.44 ms through PIL's open, load and the copy out to numpy (bench/data_loader.py's decode
    rows; one core, AMD EPYC). PIL uses the same libjpeg-turbo with the same default (ISLOW DCT,
    fancy upsampling), so the pixels are equal (tests/test_data.py). The DCT scale is PIL's
    `draft` choice (a power of two), not simplejpeg's own (any k/8), so that crops are the same
    whichever decoder ran. Anything simplejpeg refuses (PNG, WebP, CMYK, a corrupt or truncated
    file: its strict mode rejects what libjpeg only warns about) goes through `decode_image`,
    which stays the one judge of a bad image. CMYK JPEGs go there too: PIL's ink -> RGB
    conversion differs from libjpeg-turbo's by a level."""
    ext = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
    data = raw[ext] if ext is not None else b""
    if data[:2] == _JPEG_MAGIC:
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            if colorspace in _PIL_COLORSPACES:
                raise ValueError(colorspace)
            scale = _draft_scale(height, width, min_size)
            return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-height // scale),
                                          min_width=-(-width // scale))
        except ValueError:
            pass  # PIL decides: it decodes what libjpeg can, and says why it cannot
    return np.asarray(decode_image(raw, min_size))


def _draft_scale(height: int, width: int, min_size: int | None) -> int:
    """The DCT scale (1, 2, 4 or 8) PIL's JPEG `draft` picks for a requested square min_size:
    the largest power of two that leaves both sides at least min_size."""
    if not min_size:
        return 1
    fits = min(width // min_size, height // min_size)
    return next((scale for scale in (8, 4, 2) if fits >= scale), 1)


def decode_caption(raw: RawSample) -> str:
    data = raw.get(CAPTION_EXTENSION)
    if data is None:
        raise BadSample(
            f"no caption (.{CAPTION_EXTENSION} missing) (members: {member_names(raw)})"
        )
    try:
        caption = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadSample(f"caption (.{CAPTION_EXTENSION}) is not UTF-8") from None
    if not caption:
        raise BadSample(f"empty caption (.{CAPTION_EXTENSION})")
    return caption


def decode_metadata(raw: RawSample) -> dict[str, Any]:
    """The img2dataset .json member, or {} if absent or unparsable (metadata is never required)."""
    try:
        meta = json.loads(raw[METADATA_EXTENSION]) if METADATA_EXTENSION in raw else {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def member_names(raw: RawSample) -> str:
    return ", ".join(sorted(k for k in raw if not k.startswith("__"))) or "none"


def class_label(raw: RawSample) -> int | None:
    """The integer of a `.cls` member (webdataset's classification convention)."""
    data = raw.get(CLASS_EXTENSION)
    if data is None:
        return None
    try:
        return int(data.decode("utf-8").strip())
    except ValueError:
        return None


def captions(raw: RawSample) -> list[str] | None:
    """Every caption of an image: a `captions` list in its .json if present, else one per
    non-empty line of its .txt (Flickr30k/COCO shards hold five per image)."""
    listed = decode_metadata(raw).get("captions")
    if isinstance(listed, list) and listed:
        found = [str(c).strip() for c in listed if str(c).strip()]
    else:
        try:
            found = [line.strip() for line in decode_caption(raw).splitlines() if line.strip()]
        except BadSample:
            return None
    return found or None


def sample_problems(raw: RawSample) -> list[str]:
    """Everything wrong with one training sample (empty when the trainer would use it): the
    same checks, in the same words, as the trainer's skip reasons."""
    problems = []
    if raw.get("__error__"):
        problems.append(raw["__error__"])
    for check in (decode_image, decode_caption):
        try:
            check(raw)
        except BadSample as bad:
            problems.append(str(bad))
    if METADATA_EXTENSION in raw:
        try:
            json.loads(raw[METADATA_EXTENSION])
        except ValueError as exc:
            problems.append(f"unreadable .json ({exc})")
    return problems
