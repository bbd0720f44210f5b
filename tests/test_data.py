"""The training data pipeline on real (tiny) webdataset tars written here with tarfile + PIL."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import (
    DataConfig, DataError, build_train_loader, smallest_decode_size,
)
from data_pipeline.shard_format import decode_image, decode_metadata, read_shard
from eval.shard_images import ShardImages, shard_urls
from training.data.sources import epoch_shards, expand_source, expand_sources
from training.data.transforms import (
    CLIP_MEAN, CLIP_MEAN_UINT8, ColorMix, build_eval_transform, build_train_transform, draw_color_mix,
    normalize_images,
)

PAD_ID = 0
SOT, EOT = 1, 2


class CharTokenizer:
    """Picklable stand-in for the real tokenizer: one id per character, SOT/EOT around."""

    def __call__(self, text: str) -> list[int]:
        return [SOT] + [ord(c) for c in text] + [EOT]

    @staticmethod
    def decode(ids: torch.Tensor) -> str:
        return "".join(chr(i) for i in ids.tolist() if i not in (PAD_ID, SOT, EOT))


tokenize = CharTokenizer()


def jpeg(seed: int, size: tuple[int, int] = (24, 20)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def sample(key: str, caption: str | None, image: bytes | None = None, **extra: bytes):
    """Tar members of one img2dataset-style sample (None leaves a member out)."""
    members = {"jpg": jpeg(zlib.crc32(key.encode())) if image is None else image}
    if caption is not None:
        members["txt"] = caption.encode()
    members["json"] = json.dumps({"key": key, "caption": caption}).encode()
    members.update(extra)
    return [(f"{key}.{ext}", data) for ext, data in members.items() if data is not None]


def write_tar(path: Path, samples: list[list[tuple[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for members in samples:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def write_source(folder: Path, shards: int, per_shard: int, prefix: str) -> Path:
    """`shards` tars of `per_shard` good samples, captions "<prefix> <shard> <i>", + sizes.json."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for s in range(shards):
        name = f"{s:05d}.tar"
        write_tar(folder / name, [
            sample(f"{prefix}{s:03d}{i:03d}", f"{prefix} {s} {i}") for i in range(per_shard)
        ])
        sizes[name] = per_shard
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return folder


def truncate_inside(path: Path, member: str) -> None:
    """Cut the tar in the middle of `member`'s data, as an interrupted download would."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    with open(path, "r+b") as f:
        f.truncate(info.offset_data + info.size // 2)


def config(shards, **overrides) -> DataConfig:
    defaults = dict(
        train_shards=str(shards), num_samples=100, workers=0, image_size=16, batch_size=4,
        sample_shuffle_buffer=0, scale=(0.9, 1.0), seed=0,
    )
    return DataConfig(**(defaults | overrides))


def take(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def captions(batch) -> list[str]:
    return [tokenize.decode(row) for row in batch["text"]]


# --------------------------------------------------------------------------------- listing


def test_brace_pattern_directory_and_sources(tmp_path):
    write_source(tmp_path / "a", shards=4, per_shard=2, prefix="a")
    write_source(tmp_path / "b", shards=2, per_shard=2, prefix="b")
    assert expand_source(str(tmp_path / "a/{00001..00002}.tar")) == [
        str(tmp_path / "a/00001.tar"), str(tmp_path / "a/00002.tar")]
    assert expand_source(str(tmp_path / "a")) == [
        str(tmp_path / f"a/{i:05d}.tar") for i in range(4)]
    assert [len(s) for s in expand_sources(f"{tmp_path / 'a'}::{tmp_path / 'b'}")] == [4, 2]
    assert len(expand_source(f"file://{tmp_path / 'a'}")) == 4
    with pytest.raises(DataError, match=r"shard not found: .*00004\.tar \(and 3 more\)"):
        build_train_loader(config(tmp_path / "a/{00000..00007}.tar"), tokenize, PAD_ID)


def test_config_validation():
    with pytest.raises(ValueError, match="2 sources"):
        DataConfig(train_shards="a::b", train_data_weights=[1.0])
    with pytest.raises(ValueError, match="empty source"):
        DataConfig(train_shards="a::")
    with pytest.raises(ValueError, match="scale"):
        DataConfig(train_shards="a", scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="hflip"):
        DataConfig(train_shards="a", hflip=2.0)
    with pytest.raises(TypeError):
        DataConfig(train_shards="a", no_such_option=1)
    assert DataConfig(train_shards="a", scale=[0.5, 1]).scale == (0.5, 1.0)


def test_num_samples_from_sizes_json(tmp_path):
    a = write_source(tmp_path / "a", shards=3, per_shard=5, prefix="a")
    b = write_source(tmp_path / "b", shards=2, per_shard=7, prefix="b")
    cfg = config(f"{a}/{{00000..00001}}.tar::{b}", num_samples=None)
    loader = build_train_loader(cfg, tokenize, PAD_ID)
    assert loader.num_samples == 2 * 5 + 2 * 7
    assert loader.steps_per_epoch(global_batch=8) == 3
    (b / "sizes.json").unlink()
    with pytest.raises(DataError, match="num_samples"):
        build_train_loader(cfg, tokenize, PAD_ID)


# --------------------------------------------------------------------------------- sharding


def test_rank_and_worker_split_is_disjoint(tmp_path):
    folder = write_source(tmp_path / "a", shards=8, per_shard=3, prefix="a")
    urls = expand_source(str(folder))
    for epoch in range(3):
        parts = [epoch_shards(urls, seed=5, source=0, epoch=epoch, shuffle=True, worker=w,
                              num_workers=4) for w in range(4)]
        flat = [u for part in parts for u in part]
        assert sorted(flat) == urls  # disjoint and complete
    assert parts != [epoch_shards(urls, seed=5, source=0, epoch=0, shuffle=True, worker=w,
                                  num_workers=4) for w in range(4)]  # reshuffled per epoch

    # End to end: what each (rank, worker) actually reads in its first epoch (2 shards x 3).
    seen = []
    for rank in range(2):
        loader = build_train_loader(config(folder, workers=2), tokenize, PAD_ID, rank, 2)
        stream = loader._loader.dataset
        for role in range(2):
            raw = stream.raw_samples(role)
            seen.append({next(raw)["__url__"] for _ in range(6)})
    assert all(len(s) == 2 for s in seen)
    assert set().union(*seen) == set(urls) and sum(map(len, seen)) == 8


def test_fewer_shards_than_workers_wraps_around(tmp_path):
    urls = [f"s{i}.tar" for i in range(3)]
    parts = [epoch_shards(urls, seed=0, source=0, epoch=0, shuffle=True, worker=w, num_workers=4)
             for w in range(4)]
    assert all(len(p) == 1 for p in parts) and {p[0] for p in parts} == set(urls)


def test_sources_are_mixed_by_weight(tmp_path):
    a = write_source(tmp_path / "a", shards=2, per_shard=6, prefix="a")
    b = write_source(tmp_path / "b", shards=6, per_shard=6, prefix="b")

    def share_of_a(**overrides) -> float:
        cfg = config(f"{a}::{b}", batch_size=16, **overrides)
        loader = build_train_loader(cfg, tokenize, PAD_ID)
        firsts = torch.cat([batch["text"][:, 1] for batch in take(loader, 25)])
        return (firsts == ord("a")).float().mean().item()

    assert share_of_a(train_data_weights=[3.0, 1.0]) == pytest.approx(0.75, abs=0.06)
    # None = proportional to size (sizes.json: 12 vs 36 samples).
    assert share_of_a() == pytest.approx(0.25, abs=0.06)


# --------------------------------------------------------------------------------- bad data


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_tar(folder / "00000.tar", [
        sample("g0", "good 0"),
        sample("bad_jpg", "bad", image=b"not a jpeg"),
        sample("g1", "good 1"),
        sample("no_txt", None),
        sample("g2", "good 2"),
        sample("empty_txt", "   "),
        sample("g3", "good 3"), sample("g4", "good 4"), sample("g5", "good 5"),
    ])
    write_tar(folder / "00001.tar", [sample(f"t{i}", f"tail {i}") for i in range(6)])
    truncate_inside(folder / "00001.tar", "t3.jpg")
    cfg = config(folder, batch_size=3, shard_shuffle=False)
    loader = build_train_loader(cfg, tokenize, PAD_ID)

    batches = take(loader, 4)
    assert [captions(b) for b in batches] == [
        ["good 0", "good 1", "good 2"],
        ["good 3", "good 4", "good 5"],
        ["tail 0", "tail 1", "tail 2"],  # t3 onwards lost to the truncation; next epoch goes on
        ["good 0", "good 1", "good 2"],
    ]
    # 3 bad samples in shard 0 (twice read) + 1 for the truncated tail of shard 1.
    assert loader.skipped_samples == 3 + 1 + 2
    assert loader.state_dict()["consumed"] == [9 + 4 + 5]


def test_tar_cut_at_a_member_header_is_reported(tmp_path):
    # tarfile itself takes a tar that stops at (or inside) a header for a complete one.
    path = write_tar(tmp_path / "whole.tar", [sample(f"k{i}", f"c {i}") for i in range(4)])
    with tarfile.open(path) as tar:
        header = tar.getmember("k2.jpg").offset
    for cut in (header, header + 100):
        (tmp_path / "cut.tar").write_bytes(path.read_bytes()[:cut])
        items = list(read_shard(str(tmp_path / "cut.tar"), visit=0))
        assert [item["__key__"] for item in items[:2]] == ["k0", "k1"]
        assert "(truncated file)" in items[2]["__error__"] and items[2]["__visit_total__"] == 3
    assert all("__error__" not in item for item in read_shard(str(path), visit=0))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_shard_without_usable_sample_stops_the_run_naming_it(tmp_path, workers):
    folder = write_source(tmp_path / "s", shards=1, per_shard=8, prefix="a")
    # Classification-style shard: image + label, no caption (OpenCLIP hangs on this).
    write_tar(folder / "00001.tar", [
        [(f"c{i}.jpg", jpeg(i)), (f"c{i}.cls", b"3")] for i in range(5)])
    loader = build_train_loader(config(folder, workers=workers, batch_size=2), tokenize, PAD_ID)
    with pytest.raises(DataError, match=r"00001\.tar.*no usable sample.*no caption \(\.txt missing") as err:
        take(loader, 20)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------- batches


def test_text_is_padded_to_the_longest_caption_of_each_batch(tmp_path):
    texts = ["a", "a much longer caption", "mid size", "xy", "b", "c", "dd", "eee"]
    write_tar(tmp_path / "00000.tar", [sample(f"k{i}", t) for i, t in enumerate(texts)])
    loader = build_train_loader(config(tmp_path, shard_shuffle=False), tokenize, PAD_ID)
    for batch, expected in zip(take(loader, 2), (texts[:4], texts[4:])):
        longest = max(len(tokenize(t)) for t in expected)
        assert batch["text"].dtype == torch.long and batch["text"].shape == (4, longest)
        for row, text in zip(batch["text"], expected):
            ids = tokenize(text)
            assert row[: len(ids)].tolist() == ids and (row[len(ids):] == PAD_ID).all()
        # uint8 until the trainer normalises on its device (training.data.transforms.normalize_images)
        assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.uint8


# --------------------------------------------------------------------------------- resume


def write_resume_sources(tmp_path: Path) -> tuple[Path, Path]:
    """The resume tests' two sources: 4 shards of 6 pairs, and one shard with an undecodable
    image between two good pairs."""
    main = write_source(tmp_path / "main", shards=4, per_shard=6, prefix="s")
    extra = tmp_path / "extra"
    extra.mkdir()
    write_tar(extra / "00000.tar", [
        sample("r0", "r 0"), sample("broken", "broken", image=b"garbage"), sample("r1", "r 1")])
    return main, extra


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers,resampled", [(0, False), (2, False), (2, True)])
def test_resume_gives_exactly_the_uninterrupted_batches(tmp_path, workers, resampled):
    main, extra = write_resume_sources(tmp_path)
    cfg = config(
        f"{main}::{extra}", train_data_weights=[2.0, 1.0], resampled=resampled, workers=workers,
        batch_size=4, sample_shuffle_buffer=8, scale=(0.5, 1.0), hflip=0.5, color_jitter=0.3,
        random_erasing=0.3, seed=3,
    )
    total, stop = 9, 5  # stop at a step that is not a multiple of the worker count
    uninterrupted = build_train_loader(cfg, tokenize, PAD_ID)
    expected = take(uninterrupted, total)

    first = build_train_loader(cfg, tokenize, PAD_ID)
    head = take(first, stop)
    state = json.loads(json.dumps(first.state_dict()))  # survives a round trip through a file
    first.close()
    resumed = build_train_loader(cfg, tokenize, PAD_ID, states=[state])
    got = head + take(resumed, total - stop)

    assert torch.equal(
        torch.cat([b["image"] for b in got]), torch.cat([b["image"] for b in expected]))
    for mine, theirs in zip(got, expected):
        assert torch.equal(mine["text"], theirs["text"])
    assert resumed.skipped_samples == uninterrupted.skipped_samples >= 1
    assert resumed.state_dict() == uninterrupted.state_dict()
    # Augmentation is really on: a sample seen twice gives two different images.
    first_image, repeats = {}, 0
    for batch in expected:
        for caption, image in zip(captions(batch), batch["image"]):
            if caption in first_image:
                repeats += 1
                assert not torch.equal(first_image[caption], image)
            first_image.setdefault(caption, image)
    assert repeats > 0

    with pytest.raises(DataError, match="seed: 3 -> 4"):
        build_train_loader(dataclasses.replace(cfg, seed=4), tokenize, PAD_ID, states=[state])


def _ranks(cfg, world: int, states=None):
    batch = cfg.batch_size
    return [build_train_loader(dataclasses.replace(cfg, batch_size=batch), tokenize, PAD_ID,
                               rank, world, states) for rank in range(world)]


def _run_layouts(cfg, global_batch: int, plan: list[tuple[int, int, int]]) -> list[list[str]]:
    """Train-loader steps over a chain of layouts: plan = [(world, workers, steps), ...], each
    resumed from the last one's states. Returns the keys of each global step."""
    steps, states = [], None
    for world, workers, n in plan:
        layout_cfg = dataclasses.replace(cfg, workers=workers, batch_size=global_batch // world)
        loaders = _ranks(layout_cfg, world, states)
        for _ in range(n):
            steps.append([key for loader in loaders for key in next(loader)["keys"]])
        states = json.loads(json.dumps([loader.state_dict() for loader in loaders]))
        notes = {loader.resume_note for loader in loaders}
        assert len(notes) == 1  # every rank computed the same handover
        for loader in loaders:
            loader.close()
    return steps


@pytest.mark.parametrize("plan", [
    [(2, 1, 3), (1, 1, 13)],  # 2 ranks -> 1
    [(1, 1, 3), (2, 1, 13)],  # 1 rank -> 2
    [(2, 2, 2), (3, 1, 2), (4, 2, 12)],  # two changes, workers too: the second replays the first
])
def test_resume_on_another_world_size_takes_each_sample_of_the_epoch_once(tmp_path, plan):
    # 24 shards: every layout's workers (2..8) get equally many, so its epochs stay in step.
    folder = write_source(tmp_path / "s", shards=24, per_shard=4, prefix="k")
    every_key = sorted(f"{url}#{item['__key__']}" for url in expand_source(str(folder))
                       for item in read_shard(url))
    cfg = config(folder, num_samples=96, sample_shuffle_buffer=10, seed=7)
    global_batch, per_epoch = 12, 96 // 12
    steps = _run_layouts(cfg, global_batch, plan)
    assert len(steps) == 2 * per_epoch
    for epoch in range(2):  # the interrupted epoch, then a whole epoch on the last layout
        keys = [k for step in steps[epoch * per_epoch:(epoch + 1) * per_epoch] for k in step]
        assert sorted(keys) == every_key
    # The order is the seed's: the same chain gives the same steps, another seed others.
    assert _run_layouts(cfg, global_batch, plan) == steps
    assert _run_layouts(dataclasses.replace(cfg, seed=8), global_batch, plan) != steps


def test_a_handover_is_said_in_one_line(tmp_path):
    folder = write_source(tmp_path / "s", shards=4, per_shard=8, prefix="k")
    cfg = config(folder, num_samples=32, sample_shuffle_buffer=4, batch_size=8)
    first = _ranks(cfg, 1)
    next(first[0])
    states = [first[0].state_dict()]
    first[0].close()
    halves = _ranks(dataclasses.replace(cfg, batch_size=4), 2, states)
    assert halves[0].resume_note == (
        "data: 1 ranks x 1 workers x batch 8 -> 2 ranks x 1 workers x batch 4: the 24 samples "
        "the epoch still owed are shared out anew, then epoch 1 begins")
    for loader in halves:
        loader.close()


# --------------------------------------------------------------------------------- sources


def test_pipe_and_fsspec_sources(tmp_path):
    folder = write_source(tmp_path / "s", shards=2, per_shard=4, prefix="p")
    for spec in (f"pipe:cat {folder}/{{00000..00001}}.tar", f"file://{folder}"):
        loader = build_train_loader(config(spec, shard_shuffle=False), tokenize, PAD_ID)
        assert captions(next(loader)) == ["p 0 0", "p 0 1", "p 0 2", "p 0 3"]
        loader.close()


def _key_and_meta(raw):
    return raw["__key__"], decode_metadata(raw)


def test_eval_images_are_one_ordered_pass_with_keys_and_metadata(tmp_path):
    # eval's shard reader (the trainer's old EvalLoader is gone): same shards, same judge.
    folder = write_source(tmp_path / "s", shards=3, per_shard=5, prefix="e")
    write_tar(folder / "00003.tar", [sample("e_ok", "fine"), sample("e_bad", "x", image=b"zz")])
    images = ShardImages(shard_urls(str(folder), "test"), 16, _key_and_meta)
    for _ in range(2):  # re-iterable
        pairs = list(images)
        assert all(image.shape == (3, 16, 16) for image, _ in pairs)
        keys = [key for _, (key, _) in pairs]
        expected = [f"e{s:03d}{i:03d}" for s in range(3) for i in range(5)] + ["e_ok"]
        assert keys == expected  # in order, the undecodable e_bad skipped
        assert [meta["key"] for _, (_, meta) in pairs] == keys

    pipe = ShardImages([f"pipe:cat {folder}/00000.tar"], 16, _key_and_meta)
    assert [key for _, (key, _) in pipe] == [f"e000{i:03d}" for i in range(5)]


# --------------------------------------------------------------------------------- transforms


# (image side, output size, bound on the mean |difference| in 0..255 levels); measured 0.67,
# 0.61, 4.15, 0.64. A wrong crop box differs by tens of levels on these images.
@pytest.mark.parametrize("side, size, bound", [(256, 224, 1.0), (100, 64, 1.0), (600, 64, 6.0), (40, 64, 1.0)])
def test_resized_crop_draws_torchvisions_crops_and_matches_its_pixels(side, size, bound):
    """Same crop boxes as torchvision's RandomResizedCrop for the same seed (so the scale and
    ratio distribution is its own), pixels within a level of its antialiased bicubic, upscaling
    (40 -> 64) included. A reduction beyond 2x (600 -> 64) takes OpenCV's area filter, a different
    antialiasing kernel from PIL's widened bicubic: a few levels apart on texture this fine."""
    from torchvision import transforms as T
    from training.data.transforms import ResizedCrop

    pixels = np.random.default_rng(side).integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize((side, side), Image.BICUBIC)  # smooth, photo-like
    ours, theirs = ResizedCrop(size, (0.5, 1.0)), T.RandomResizedCrop(
        size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    differences = []
    for seed in range(20):
        torch.manual_seed(seed)
        mine = ours(image)
        torch.manual_seed(seed)
        reference = T.functional.pil_to_tensor(theirs(image))
        assert mine.shape == reference.shape == (3, size, size) and mine.dtype == torch.uint8
        differences.append((mine.float() - reference.float()).abs().mean().item())
    assert max(differences) < bound, differences


def test_transforms_shapes_and_normalization():
    cfg = DataConfig(train_shards="x", image_size=32, hflip=0.5, color_jitter=0.2,
                     random_erasing=0.5)
    image = Image.new("RGB", (50, 40), tuple(round(255 * m) for m in CLIP_MEAN))
    out = build_train_transform(cfg.augment())(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    # Without jitter, erased boxes and the image share the mean colour: all of it normalises to ~0.
    erasing_only = DataConfig(train_shards="x", image_size=32, random_erasing=1.0)
    normalized = normalize_images(build_train_transform(erasing_only.augment())(image)[None], torch.device("cpu"))
    assert normalized.dtype == torch.float32 and normalized.abs().max() < 0.02
    evaluated = build_eval_transform(32)(image)
    assert evaluated.shape == (3, 32, 32) and evaluated.abs().max() < 0.02  # mean color -> ~0
    assert torch.equal(evaluated, build_eval_transform(32)(image))


def test_color_mix_is_the_affine_colour_map_it_draws():
    pixels = torch.randint(0, 256, (3, 9, 7), dtype=torch.uint8)
    torch.manual_seed(3)
    mixed = ColorMix(0.1)(pixels)
    torch.manual_seed(3)
    mix = draw_color_mix(0.1)
    matrix, offset = mix[:9].view(3, 3), mix[9:]
    assert (matrix - torch.eye(3)).abs().max() > 0 and offset.abs().max() > 0
    # Reference: per pixel, M (x - mean) + mean + offset, rounded and clamped to 0..255.
    mean = torch.tensor(CLIP_MEAN_UINT8, dtype=torch.float64)
    x = pixels.double().permute(1, 2, 0)  # H, W, 3
    expected = ((x - mean) @ matrix.double().T + mean + offset.double()).round().clamp(0, 255)
    assert mixed.dtype == torch.uint8
    assert (mixed.double().permute(1, 2, 0) - expected).abs().max() <= 1  # float32 vs float64 rounding
    # sigma 0 is the identity; DataConfig refuses a negative one in one line.
    assert torch.equal(ColorMix(0.0)(pixels), pixels)
    with pytest.raises(ValueError, match="color_mix must be >= 0"):
        DataConfig(train_shards="x", color_mix=-0.1)


def test_jpegs_decode_at_a_reduced_scale_never_below_what_the_crop_needs():
    cfg = DataConfig(train_shards="x", image_size=64, scale=(0.8, 1.0))
    need = smallest_decode_size(cfg.augment())  # the crop's shorter side is >= sqrt(0.8 * 3/4) of the image's
    assert need == 83
    encoded = io.BytesIO()
    Image.new("RGB", (256, 256), (200, 10, 10)).save(encoded, "JPEG")
    assert decode_image({"jpg": encoded.getvalue()}, need).size == (128, 128)  # libjpeg's 1/2
    assert decode_image({"jpg": encoded.getvalue()}).size == (256, 256)
    too_big = smallest_decode_size(DataConfig(train_shards="x", image_size=224, scale=(0.9, 1.0)).augment())
    assert decode_image({"jpg": encoded.getvalue()}, too_big).size == (256, 256)


def _encoded(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=options.pop("format", "JPEG"), **options)
    return out.getvalue()


@pytest.mark.parametrize("size, min_size", [
    ((256, 256), None), ((256, 256), 83), ((256, 256), 246), ((301, 517), 60), ((517, 301), 37),
    ((33, 47), 5), ((640, 480), 100)])
def test_the_trainers_jpeg_decode_gives_pils_pixels_at_pils_dct_scale(size, min_size):
    """decode_pixels (libjpeg-turbo through simplejpeg) == decode_image (PIL): same pixels, same
    reduced DCT scale, for colour (4:2:0 and 4:4:4) and greyscale JPEGs of odd sizes."""
    from data_pipeline.shard_format import decode_pixels

    rng = np.random.default_rng(sum(size))
    smooth = rng.integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    picture = Image.fromarray(smooth).resize(size, Image.BILINEAR)  # JPEG-like content
    for encoded in (_encoded(picture), _encoded(picture, subsampling=0, quality=95),
                    _encoded(picture.convert("L"))):
        pixels = decode_pixels({"jpg": encoded}, min_size)
        reference = np.asarray(decode_image({"jpg": encoded}, min_size))
        assert pixels.dtype == np.uint8 and pixels.shape == reference.shape
        assert np.array_equal(pixels, reference)


def test_the_trainers_decode_leaves_other_formats_and_bad_jpegs_to_pil():
    """PNG, WebP, CMYK JPEGs and a JPEG under a .png name decode as PIL decodes them; a truncated
    JPEG is judged bad with PIL's reason (one judge of a bad image)."""
    from data_pipeline.shard_format import BadSample, decode_pixels

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    for raw in ({"png": _encoded(picture, format="PNG")}, {"webp": _encoded(picture, format="WEBP")},
                {"jpg": _encoded(picture.convert("CMYK"))}, {"png": _encoded(picture)}):
        assert np.array_equal(decode_pixels(raw), np.asarray(decode_image(raw)))
    truncated = {"jpg": _encoded(picture)[:300]}
    with pytest.raises(BadSample) as by_pil:
        decode_image(truncated)
    with pytest.raises(BadSample) as ours:
        decode_pixels(truncated)
    assert str(ours.value) == str(by_pil.value)
    with pytest.raises(BadSample, match="no image"):
        decode_pixels({"txt": b"caption only"})


@pytest.mark.parametrize("height, width, scale", [
    (256, 256, (0.9, 1.0)), (200, 320, (0.08, 1.0)), (480, 120, (0.5, 1.0)), (1, 1, (0.9, 1.0))])
def test_crop_box_draws_torchvisions_boxes_and_leaves_the_generator_where_it_would(
        height, width, scale):
    from torchvision import transforms as T
    from training.data.transforms import crop_box

    image = Image.new("RGB", (width, height))
    for seed in range(300):
        torch.manual_seed(seed)
        reference = T.RandomResizedCrop.get_params(image, scale, (3 / 4, 4 / 3))
        after_reference = torch.rand(1)
        torch.manual_seed(seed)
        assert crop_box(height, width, scale, (3 / 4, 4 / 3)) == tuple(reference), seed
        assert torch.equal(torch.rand(1), after_reference)  # the same number of draws taken
