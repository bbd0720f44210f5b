"""data_pipeline.curate.hash_duplicates and embedding_duplicates against brute-force O(N^2) versions of the same rules.

Hash and flat-embedding results must equal the reference exactly (same kept set, same targets);
IVF-PQ is approximate, so it is held to a recall floor and to never reporting a pair below the
threshold. Images and vectors are synthetic and seeded."""

from __future__ import annotations

import io

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from data_pipeline.curate.embedding_duplicates import (
    EmbeddingIndexChoice,
    choose_index,
    duplicates_by_embedding,
    matches_by_embedding,
)
from data_pipeline.curate.hash_duplicates import (
    duplicates_by_hash,
    matches_by_hash,
    perceptual_hash,
    perceptual_hashes,
)


# ---------------------------------------------------------------- reference implementations


def greedy_hash_reference(hashes: np.ndarray, radius: int) -> np.ndarray:
    targets = np.full(len(hashes), -1, np.int64)
    kept: list[int] = []
    for i, h in enumerate(hashes):
        if kept:
            distances = np.bitwise_count(hashes[kept] ^ h)
            if distances.min() <= radius:
                targets[i] = kept[int(np.argmin(distances))]  # first minimum: lowest index
        if targets[i] < 0:
            kept.append(i)
    return targets


def matches_hash_reference(queries: np.ndarray, references: np.ndarray, radius: int) -> np.ndarray:
    distances = np.bitwise_count(queries[:, None] ^ references[None, :])
    return np.where(distances.min(1) <= radius, distances.argmin(1), -1)


def greedy_embedding_reference(features: np.ndarray, threshold: float) -> np.ndarray:
    sims = features @ features.T
    targets = np.full(len(features), -1, np.int64)
    kept: list[int] = []
    for i in range(len(features)):
        if kept and sims[i, kept].max() >= threshold:
            targets[i] = kept[int(np.argmax(sims[i, kept]))]
        else:
            kept.append(i)
    return targets


# ---------------------------------------------------------------- data


def synthetic_photo(seed: int, size: int = 256) -> Image.Image:
    """A gradient with overlapping blurred shapes: enough low-frequency structure for a DCT hash."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * xx + np.sin(angle) * yy
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    image = Image.fromarray((c0 + (c1 - c0) * ramp[..., None]).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * size
        w, h = rng.uniform(0.1, 0.5, 2) * size
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = rng.integers(3)
        if shape == 0:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=fill)
        elif shape == 1:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=fill)
        else:
            draw.polygon([tuple(p) for p in rng.uniform(0, size, (3, 2))], fill=fill)
    return image.filter(ImageFilter.GaussianBlur(1.5))


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def planted_hashes(rng: np.random.Generator, n_base: int, n_copies: int, max_flips: int):
    """Random hashes plus copies of earlier entries (copies of copies too, so chains occur) with
    0..max_flips bits flipped, then shuffled so a copy may come before its original."""
    hashes = list(rng.integers(0, 2**64, n_base, dtype=np.uint64))
    for _ in range(n_copies):
        h = int(hashes[rng.integers(len(hashes))])
        for bit in rng.choice(64, size=rng.integers(0, max_flips + 1), replace=False):
            h ^= 1 << int(bit)
        hashes.append(np.uint64(h))
    return np.array(hashes, dtype=np.uint64)[rng.permutation(len(hashes))]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def planted_vectors(rng, n_base, n_copies, dim, noise, shuffle=True):
    """Random unit vectors plus noisy copies of earlier ones: cosine ~ 1/sqrt(1 + noise**2)."""
    vectors = list(unit(rng.standard_normal((n_base, dim))))
    sources = []
    for _ in range(n_copies):
        source = int(rng.integers(len(vectors)))
        sigma = rng.uniform(*noise)
        copy = vectors[source] + sigma * rng.standard_normal(dim) / np.sqrt(dim)
        vectors.append(unit(copy[None])[0])
        sources.append(source)
    vectors = np.stack(vectors)
    if shuffle:
        vectors = vectors[rng.permutation(len(vectors))]
    return np.ascontiguousarray(vectors), np.array(sources)


# ---------------------------------------------------------------- perceptual hashes


def test_perceptual_hash_survives_reencode_resize_and_crop():
    images = [synthetic_photo(seed) for seed in range(8)]
    for image in images:
        original = perceptual_hash(jpeg(image, 95))
        variants = {
            "jpeg q70": jpeg(image, 70),
            "resize 256->200": image.resize((200, 200), Image.BICUBIC),
            "crop to 96% of the area": image.crop((3, 3, 254, 254)),
        }
        for name, variant in variants.items():
            assert (original ^ perceptual_hash(variant)).bit_count() <= 8, name
    hashes = perceptual_hashes(images)
    distances = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    assert distances[np.triu_indices(len(images), 1)].min() > 16


def test_perceptual_hash_matches_imagehash_bit_order():
    image = synthetic_photo(100)
    assert perceptual_hash(image) == int(str(imagehash.phash(image)), 16)
    hashes = perceptual_hashes([image, synthetic_photo(101)])
    assert hashes.dtype == np.uint64 and int(hashes[0]) == perceptual_hash(image)


# ---------------------------------------------------------------- hash search


@pytest.mark.parametrize("radius", [0, 1, 3, 4, 8, 16])
@pytest.mark.parametrize("batch_size", [97, 4096])
def test_duplicates_by_hash_equals_brute_force(radius, batch_size):
    rng = np.random.default_rng(radius)
    hashes = planted_hashes(rng, n_base=1500, n_copies=900, max_flips=radius + 3)
    expected = greedy_hash_reference(hashes, radius)
    assert (expected >= 0).sum() > 100  # the planted copies are really there
    np.testing.assert_array_equal(duplicates_by_hash(hashes, radius, batch_size=batch_size),
                                  expected)


def test_duplicates_by_hash_greedy_rule():
    a = 0
    b = a ^ 0b1111  # 4 bits from a
    c = b ^ 0b1111_0000  # 4 bits from b, 8 from a
    hashes = np.array([a, b, c, a], dtype=np.uint64)
    # b goes (near a); c stays: it is near only b, which was removed; the repeat of a goes to a.
    np.testing.assert_array_equal(duplicates_by_hash(hashes, 4), [-1, 0, -1, 0])
    # z is near two kept items: it goes to the closer y (1 bit), not the earlier x (2 bits).
    x, y, z = 0b000, 0b111, 0b110
    np.testing.assert_array_equal(duplicates_by_hash(np.array([x, y, z], np.uint64), 2),
                                  [-1, -1, 1])
    tie = np.array([0b0011, 0b1100, 0b0110], dtype=np.uint64)  # third is 2 bits from both
    np.testing.assert_array_equal(duplicates_by_hash(tie, 2), [-1, -1, 0])


def test_duplicates_by_hash_flood_of_one_image():
    rng = np.random.default_rng(7)
    hashes = np.concatenate([rng.integers(0, 2**64, 1000, dtype=np.uint64),
                             np.full(20_000, 12345, np.uint64)])
    targets = duplicates_by_hash(hashes, 4)
    assert (targets[1001:] == 1000).all() and targets[1000] == -1


@pytest.mark.parametrize("radius", [0, 2, 5, 12])
def test_matches_by_hash_equals_brute_force(radius):
    rng = np.random.default_rng(100 + radius)
    references = planted_hashes(rng, n_base=800, n_copies=400, max_flips=radius + 2)
    queries = np.concatenate([
        rng.integers(0, 2**64, 500, dtype=np.uint64),
        references[rng.integers(len(references), size=300)] ^ np.uint64(1 << 40),
        references[rng.integers(len(references), size=300)],
    ])
    expected = matches_hash_reference(queries, references, radius)
    assert (expected >= 0).sum() >= 300
    np.testing.assert_array_equal(matches_by_hash(queries, references, radius, batch_size=128),
                                  expected)


def test_hash_inputs_are_checked():
    hashes = np.zeros(3, np.uint64)
    for radius in (-1, 17, True, 2.0):
        with pytest.raises(ValueError):
            duplicates_by_hash(hashes, radius)
    with pytest.raises(ValueError):
        duplicates_by_hash(np.zeros(3, np.int64), 2)
    with pytest.raises(ValueError):
        matches_by_hash(hashes, np.zeros((3, 2), np.uint64), 2)
    assert duplicates_by_hash(np.zeros(0, np.uint64), 3).shape == (0,)


# ---------------------------------------------------------------- embedding search


@pytest.mark.parametrize("batch_size", [128, 4096])
def test_duplicates_by_embedding_flat_equals_brute_force(batch_size):
    rng = np.random.default_rng(batch_size)
    features, _ = planted_vectors(rng, n_base=2000, n_copies=1000, dim=64, noise=(0.1, 0.75))
    expected = greedy_embedding_reference(features, threshold=0.9)
    assert 300 < (expected >= 0).sum() < 1000  # copies both above and below the threshold
    targets, choice = duplicates_by_embedding(features, 0.9, index="flat", batch_size=batch_size)
    assert choice.kind == "flat"
    np.testing.assert_array_equal(targets, expected)


def test_duplicates_by_embedding_flood_cannot_crowd_out_the_kept_copy():
    # 300 identical vectors and k=4: a plain k-NN over all items would show each copy only other
    # copies, most of them removed; searching kept items only still finds the first.
    rng = np.random.default_rng(3)
    others = unit(rng.standard_normal((500, 32)))
    flood = np.repeat(others[:1], 300, axis=0)
    features = np.concatenate([others, flood])
    targets, _ = duplicates_by_embedding(features, 0.95, index="flat", k=4, batch_size=64)
    np.testing.assert_array_equal(targets, greedy_embedding_reference(features, 0.95))
    assert (targets[500:] == 0).all()


def test_ivfpq_finds_planted_duplicates_and_never_a_false_one():
    rng = np.random.default_rng(11)
    n_base, n_copies, threshold = 16_000, 4_000, 0.9
    features, sources = planted_vectors(rng, n_base, n_copies, dim=64, noise=(0.1, 0.4),
                                        shuffle=False)  # originals first: copies are the dups
    targets, choice = duplicates_by_embedding(features, threshold, index="ivfpq")
    assert choice.kind == "ivfpq" and choice.m == 8 and choice.nprobe == 16
    found = targets[n_base:] >= 0
    assert found.mean() >= 0.95, found.mean()
    removed = np.flatnonzero(targets >= 0)
    cosines = np.einsum("nd,nd->n", features[removed], features[targets[removed]])
    assert cosines.min() >= threshold - 1e-6  # re-scored exactly: nothing below the threshold
    assert (targets[removed] < removed).all()
    assert (targets[targets[removed]] == -1).all()  # every target is itself kept
    # Decontamination with the same index kind: each copy should find a reference.
    matches, _ = matches_by_embedding(features[n_base:], features[:n_base], threshold,
                                      index="ivfpq")
    assert (matches >= 0).mean() >= 0.95
    hits = np.flatnonzero(matches >= 0)
    assert np.einsum("nd,nd->n", features[n_base:][hits], features[matches[hits]]).min() >= (
        threshold - 1e-6)


def test_matches_by_embedding_flat_equals_brute_force():
    rng = np.random.default_rng(5)
    references, _ = planted_vectors(rng, n_base=1500, n_copies=300, dim=48, noise=(0.1, 0.7))
    near = unit(references[rng.integers(len(references), size=600)]
                + rng.uniform(0.05, 0.1, (600, 1)) * rng.standard_normal((600, 48)))
    queries = np.concatenate([near, unit(rng.standard_normal((400, 48)))])
    sims = queries @ references.T
    expected = np.where(sims.max(1) >= 0.85, sims.argmax(1), -1)
    assert (expected >= 0).sum() > 300
    matches, choice = matches_by_embedding(queries, references, 0.85, batch_size=100)
    assert choice.kind == "flat"  # "auto" at this size
    np.testing.assert_array_equal(matches, expected)


def test_choose_index_by_size():
    small = choose_index(500, 128, flat_limit=1000)
    assert small.kind == "flat" and "500" in small.reason
    too_few_to_train = choose_index(5000, 128, flat_limit=1000)
    assert too_few_to_train.kind == "flat" and "5,000" in too_few_to_train.reason
    large = choose_index(20_000, 128, flat_limit=1000)
    assert large.kind == "ivfpq" and "20,000" in large.reason
    assert 128 % large.m == 0 and 8 <= 128 // large.m <= 16 and large.nbits == 8
    assert large.nlist == 20_000 // 39 and large.nprobe == 16  # 4*sqrt(n)=566, capped at n/39
    huge = choose_index(10_000_000, 512)
    assert huge.kind == "ivfpq" and huge.nlist == round(4 * np.sqrt(10_000_000))
    assert huge.m == 64 and huge.train_size == 64 * huge.nlist


def test_embedding_inputs_are_checked():
    rng = np.random.default_rng(0)
    good = unit(rng.standard_normal((20, 8)))
    with pytest.raises(ValueError, match="normalised"):
        duplicates_by_embedding(good * 1.1, 0.9)
    with pytest.raises(ValueError, match="normalised"):
        matches_by_embedding(good, np.zeros((3, 8), np.float32), 0.9)
    with pytest.raises(ValueError, match="dims"):
        matches_by_embedding(good, unit(rng.standard_normal((5, 9))), 0.9)
    with pytest.raises(ValueError):
        duplicates_by_embedding(good[0], 0.9)  # 1-D
    with pytest.raises(ValueError):
        duplicates_by_embedding(good, 1.5)
    with pytest.raises(ValueError):
        duplicates_by_embedding(good, 0.9, index="hnsw")
    with pytest.raises(ValueError, match="at least"):
        duplicates_by_embedding(good, 0.9, index="ivfpq")  # too few vectors to train
    with pytest.raises(ValueError):
        EmbeddingIndexChoice("flat", "because", nlist=4)
    with pytest.raises(ValueError):
        EmbeddingIndexChoice("hnsw", "because")
