"""Procedural glyphs: deterministic from the seeds, the digits' 8x8 format, and a rasteriser that equals the
brute-force definition (every pixel centre against every stroke segment, float64)."""
import numpy as np
import pytest
from sklearn.datasets import load_digits

from mambacl.benchmarks.glyphs import BITMAP_SIZE, BLOCK, MAX_STROKES, STROKE_POINTS, GlyphClasses, _rasterise


@pytest.fixture(scope="module")
def glyphs():
    return GlyphClasses.generate(100, class_seed=0)


def test_same_seed_gives_the_same_images_and_other_seeds_differ(glyphs):
    images, labels = glyphs.sample(300, seed=[3, 7])
    again, again_labels = GlyphClasses.generate(100, class_seed=0).sample(300, seed=[3, 7])
    assert np.array_equal(images.numpy(), again.numpy()) and np.array_equal(labels.numpy(), again_labels.numpy())
    other, _ = glyphs.sample(300, seed=[3, 8])
    assert not np.array_equal(images.numpy(), other.numpy())
    reclassed, _ = GlyphClasses.generate(100, class_seed=1).sample(300, seed=[3, 7])
    assert not np.array_equal(images.numpy(), reclassed.numpy())


def test_a_class_depends_on_its_index_and_class_seed_only(glyphs):
    small = GlyphClasses.generate(10, class_seed=0)
    assert np.array_equal(small.points, glyphs.points[:10]) and np.array_equal(small.valid, glyphs.valid[:10])


def test_classes_differ(glyphs):
    prototypes = glyphs.render(np.arange(100), np.random.default_rng(0), jitter=False).reshape(100, -1)
    distances = np.abs(prototypes[:, None] - prototypes[None]).sum(-1)
    off_diagonal = distances[~np.eye(100, dtype=bool)]
    assert off_diagonal.min() > 1.0  # every pair of classes differs by more than one full pixel of ink
    assert set(glyphs.valid.sum(1)) <= set(range(2, MAX_STROKES + 1))


def test_format_matches_the_digits(glyphs):
    images, labels = glyphs.sample(2000, seed=0)
    assert images.shape == (2000, 1, 8, 8) and str(images.dtype) == "torch.float32"
    assert labels.dtype.is_floating_point is False and 0 <= labels.min() and labels.max() < 100
    x = images.numpy()
    assert x.min() == 0.0 and x.max() == 1.0
    assert np.array_equal(x * 16, np.round(x * 16))  # on-pixel counts of 4x4 blocks, as in optdigits
    digits = load_digits().images / 16.0
    assert abs(x.mean() - digits.mean()) < 0.03
    assert abs((x == 0).mean() - (digits == 0).mean()) < 0.05
    assert abs((x == 1).mean() - (digits == 1).mean()) < 0.03


def brute_force_bitmaps(points, valid, half_width):
    """Float64, every pixel centre against every valid segment: ink where the distance <= half width."""
    n = len(points)
    axis = np.arange(BITMAP_SIZE) + 0.5
    centres = np.stack(np.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    ink = np.zeros((n, BITMAP_SIZE * BITMAP_SIZE), dtype=bool)
    strokes = points.reshape(n, MAX_STROKES, STROKE_POINTS, 2)
    for i in range(n):
        for k in np.flatnonzero(valid[i]):
            for a, b in zip(strokes[i, k, :-1], strokes[i, k, 1:]):
                t = np.clip((centres - a) @ (b - a) / max((b - a) @ (b - a), 1e-12), 0, 1)
                ink[i] |= np.linalg.norm(centres - a - t[:, None] * (b - a), axis=1) <= half_width[i]
    return ink.reshape(n, BITMAP_SIZE, BITMAP_SIZE)


def test_windowed_rasteriser_equals_brute_force(glyphs):
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 100, 12)
    start = rng.uniform(-2, BITMAP_SIZE + 2, (12, MAX_STROKES, 1, 2))  # random walks, partly off the bitmap
    points = (start + np.cumsum(rng.uniform(-3, 3, (12, MAX_STROKES, STROKE_POINTS, 2)), axis=2)).reshape(12, -1, 2)
    half_width = rng.uniform(1.0, 3.0, 12)
    ours = _rasterise(points, glyphs.valid[labels], half_width, np.zeros(12), rng)
    bitmaps = brute_force_bitmaps(points, glyphs.valid[labels], half_width)
    side = BITMAP_SIZE // BLOCK
    reference = bitmaps.reshape(12, side, BLOCK, side, BLOCK).sum(axis=(2, 4)) / 16
    assert bitmaps.any() and not bitmaps.all()
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize("call, match", [
    (lambda g: GlyphClasses.generate(0), "n_classes"),
    (lambda g: GlyphClasses.generate(10, class_seed=-1), "class_seed"),
    (lambda g: g.sample(0, seed=0), "n_images"),
    (lambda g: g.sample(4, seed=-2), "seed"),
    (lambda g: g.sample(4, seed=[1, 2.5]), "seed"),
    (lambda g: g.render(np.array([0, 100]), np.random.default_rng(0)), "labels"),
    (lambda g: g.render(np.array([[0]]), np.random.default_rng(0)), "labels"),
], ids=["no-classes", "negative-class-seed", "no-images", "negative-seed", "float-seed", "label-range",
        "label-shape"])
def test_bad_arguments_are_named(glyphs, call, match):
    with pytest.raises(ValueError, match=match):
        call(glyphs)
