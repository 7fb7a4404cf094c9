"""Procedural stroke glyphs in the format of scikit-learn's 8x8 digits: an offline pretraining source.

The digits (UCI optdigits) are the evaluation data, so pretraining needs images that are not digits but look
like them to a small backbone. Each glyph class is a fixed set of 2-4 strokes (quadratic Bezier curves and
elliptic arcs, later strokes often starting on an earlier one), drawn from ``(class_seed, class index)``.
A sample takes its class's strokes through a random affine map and a smooth sinusoidal warp, normalises the
size as the NIST preprocessing of the digits did (height filling the box, aspect ratio kept), rasterises a
binary 32x32 bitmap with a random pen width, flips a few pixels, and counts the on pixels of every 4x4 block
(0..16), which is how optdigits' 8x8 images were made from their 32x32 bitmaps. Divided by 16 this is the
``load_digits().images / 16`` format that ``split_digits`` feeds the models.

Everything is vectorised numpy (distances from all pixel centres to all stroke segments at once) and a
function of the seeds alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import numpy as np
import torch

from mambacl.benchmarks.mqar import _check_int

__all__ = ["GlyphClasses", "BITMAP_SIZE", "BLOCK", "MAX_STROKES", "STROKE_POINTS"]

BITMAP_SIZE = 32   # side of the binary bitmap, as in optdigits
BLOCK = 4          # block side: 32 / 4 = 8 px images with values 0..16
MAX_STROKES = 4
STROKE_POINTS = 16  # polyline points per stroke
_RENDER_CHUNK = 512  # images rasterised at once


def _class_strokes(rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """One class: stroke polylines ``[MAX_STROKES, STROKE_POINTS, 2]`` in about [0, 1]^2 and their mask."""
    t = np.linspace(0.0, 1.0, STROKE_POINTS)[:, None]
    points = np.zeros((MAX_STROKES, STROKE_POINTS, 2))
    n_strokes = int(rng.integers(2, MAX_STROKES + 1))
    for k in range(n_strokes):
        if rng.random() < 0.5:
            p0, p1, p2 = rng.uniform(0.0, 1.0, (3, 2))
            stroke = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
        else:
            centre, radii = rng.uniform(0.3, 0.7, 2), rng.uniform(0.15, 0.4, 2)
            angle = rng.uniform(0, 2 * np.pi) + rng.choice([-1.0, 1.0]) * rng.uniform(np.pi / 2, 2 * np.pi) * t
            stroke = centre + radii * np.concatenate([np.cos(angle), np.sin(angle)], axis=1)
        if k and rng.random() < 0.6:  # start on an earlier stroke, as pen strokes of a character join
            stroke = stroke - stroke[0] + points[rng.integers(k), rng.integers(STROKE_POINTS)]
        points[k] = stroke
    points[..., 0] *= rng.uniform(0.5, 0.9)  # digits are taller than wide
    return points, np.arange(MAX_STROKES) < n_strokes


@dataclass(frozen=True)
class GlyphClasses:
    """A fixed set of glyph classes; :meth:`sample` draws images of them.

    Attributes:
        points: stroke polylines ``[C, MAX_STROKES, STROKE_POINTS, 2]`` (x, y) in the unit square or near it.
        valid: ``[C, MAX_STROKES]`` bool, which strokes a class has.

    Examples:
        >>> glyphs = GlyphClasses.generate(100, class_seed=0)
        >>> images, labels = glyphs.sample(64, seed=1)
        >>> images.shape, images.dtype, labels.shape
        (torch.Size([64, 1, 8, 8]), torch.float32, torch.Size([64]))
    """

    points: np.ndarray
    valid: np.ndarray

    @classmethod
    def generate(cls, n_classes: int, class_seed: int = 0) -> "GlyphClasses":
        """``n_classes`` classes; class ``c`` depends on ``(class_seed, c)`` only, not on ``n_classes``."""
        n_classes = _check_int("n_classes", n_classes, 1)
        class_seed = _check_int("class_seed", class_seed, 0)
        points, valid = zip(*(_class_strokes(np.random.default_rng([class_seed, c])) for c in range(n_classes)))
        return cls(np.stack(points), np.stack(valid))

    @property
    def n_classes(self) -> int:
        return len(self.points)

    def render(self, labels: np.ndarray, rng: np.random.Generator, jitter: bool = True) -> np.ndarray:
        """Draw one image per label.

        Args:
            labels: ``[n]`` class indices in ``[0, n_classes)``.
            rng: source of the per-image affine map, warp, pen width and pixel flips.
            jitter: False draws every class with the identity map, no warp, a 2.2 px pen half-width and no flips.
        Returns:
            ``[n, 8, 8]`` float32 in [0, 1], multiples of 1/16 (on-pixel counts of 4x4 blocks / 16).
        """
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be a 1-d integer array, got shape {labels.shape}, dtype {labels.dtype}")
        if labels.size and (labels.min() < 0 or labels.max() >= self.n_classes):
            raise ValueError(f"labels must lie in [0, {self.n_classes}), got [{labels.min()}, {labels.max()}]")
        n = len(labels)
        points = self.points[labels].reshape(n, -1, 2)
        if jitter:
            angle, shear = rng.uniform(-0.25, 0.25, n), rng.uniform(-0.3, 0.3, n)
            aspect = np.exp(rng.uniform(-0.3, 0.3, n))
            cos, sin = np.cos(angle), np.sin(angle)
            linear = np.stack([np.stack([aspect * cos, aspect * (shear * cos - sin)], -1),
                               np.stack([sin, shear * sin + cos], -1)], -2)  # diag(aspect, 1) @ rotation @ shear
            points = np.einsum("nij,npj->npi", linear, points)
            amplitude = rng.uniform(0.0, 0.05, (n, 1, 2))
            frequency, phase = rng.uniform(1.0, 3.0, (n, 1, 2)), rng.uniform(0, 2 * np.pi, (n, 1, 2))
            points = points + amplitude * np.sin(2 * np.pi * frequency * points[..., ::-1] + phase)
            half_width, flip = rng.uniform(1.5, 3.0, n), rng.uniform(0.0, 0.006, n)
        else:
            half_width, flip = np.full(n, 2.2), np.zeros(n)
        valid = np.repeat(self.valid[labels], STROKE_POINTS, axis=1)  # [n, S * P]
        points = _fit_box(points, valid, half_width)
        return np.concatenate([_rasterise(points[i:i + _RENDER_CHUNK], self.valid[labels[i:i + _RENDER_CHUNK]],
                                          half_width[i:i + _RENDER_CHUNK], flip[i:i + _RENDER_CHUNK], rng)
                               for i in range(0, n, _RENDER_CHUNK)] or [np.zeros((0, 8, 8), np.float32)])

    def sample(self, n_images: int, seed: Union[int, Sequence[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``n_images`` images with uniformly drawn labels, a function of ``seed`` alone.

        Args:
            n_images: number of images.
            seed: a non-negative int or a sequence of them (``numpy.random.default_rng`` entropy; e.g.
                ``[run_seed, step]`` gives independent batches).
        Returns:
            images ``[n, 1, 8, 8]`` float32 in [0, 1] (the ``split_digits`` input format), labels ``[n]`` int64.
        """
        n_images = _check_int("n_images", n_images, 1)
        for value in (seed if isinstance(seed, Sequence) else [seed]):
            _check_int("seed", value, 0)
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, self.n_classes, n_images)
        images = self.render(labels, rng)
        return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)


def _fit_box(points: np.ndarray, valid: np.ndarray, half_width: np.ndarray) -> np.ndarray:
    """Centre each glyph in the 32-px box at the largest size (aspect kept) whose inked height fits 32 px and
    inked width 28 px, so that most glyphs fill the height, as the digits do.

    Args: points ``[n, M, 2]`` (x, y), valid ``[n, M]``, half_width ``[n]`` pen half-width in px.
    Returns: points in bitmap pixel coordinates ``[n, M, 2]``.
    """
    low = np.where(valid[..., None], points, np.inf).min(axis=1)
    high = np.where(valid[..., None], points, -np.inf).max(axis=1)
    extent = np.maximum(high - low, 1e-3)
    room = np.stack([28.0 - 2 * half_width, BITMAP_SIZE - 2 * half_width], axis=-1)
    scale = (room / extent).min(axis=1)
    return (points - (low + high)[:, None] / 2) * scale[:, None, None] + BITMAP_SIZE / 2


def _rasterise(points: np.ndarray, valid: np.ndarray, half_width: np.ndarray, flip: np.ndarray,
               rng: np.random.Generator) -> np.ndarray:
    """Binary bitmaps (pixel centres within ``half_width`` of a stroke segment, then flipped with probability
    ``flip``) reduced to 8x8 by on-pixel counts of 4x4 blocks / 16.

    Each segment is only compared with the pixels of a square window around it, large enough for the
    longest segment of the batch and its pen.

    Args: points ``[n, S * P, 2]`` px, valid ``[n, S]``, half_width and flip ``[n]``.
    Returns: ``[n, 8, 8]`` float32.
    """
    n = len(points)
    strokes = points.reshape(n, MAX_STROKES, STROKE_POINTS, 2)
    start = strokes[:, :, :-1][valid]                      # [segments, P - 1, 2] of the valid strokes
    direction = strokes[:, :, 1:][valid] - start
    image = np.repeat(np.arange(n), valid.sum(1))[:, None]  # image of each valid stroke
    pen = half_width[image]
    low = np.floor(np.minimum(start, start + direction) - pen[..., None]).astype(np.int64)
    window = int(np.ceil((np.abs(direction).max(initial=0.0) + 2 * half_width.max(initial=0.0)))) + 2
    steps = np.arange(window)
    col = low[..., 0, None, None] + steps[None, :]        # [segments, P - 1, 1, window]
    row = low[..., 1, None, None] + steps[:, None]        # [segments, P - 1, window, 1]
    (x0, y0), (dx, dy) = (np.moveaxis(a, -1, 0)[..., None, None].astype(np.float32) for a in (start, direction))
    ox, oy = (col + 0.5).astype(np.float32) - x0, (row + 0.5).astype(np.float32) - y0
    along = np.clip((ox * dx + oy * dy) / np.maximum(dx * dx + dy * dy, 1e-12), 0.0, 1.0)
    ex, ey = ox - along * dx, oy - along * dy
    hit = ex * ex + ey * ey <= (pen ** 2).astype(np.float32)[..., None, None]
    hit &= (col >= 0) & (col < BITMAP_SIZE) & (row >= 0) & (row < BITMAP_SIZE)
    ink = np.zeros((n, BITMAP_SIZE, BITMAP_SIZE), dtype=bool)
    which = np.broadcast_to(image[..., None, None], hit.shape)[hit]
    ink[which, np.broadcast_to(row, hit.shape)[hit], np.broadcast_to(col, hit.shape)[hit]] = True
    ink ^= rng.random(ink.shape) < flip[:, None, None]
    side = BITMAP_SIZE // BLOCK
    counts = ink.reshape(n, side, BLOCK, side, BLOCK).sum(axis=(2, 4))
    return (counts / float(BLOCK * BLOCK)).astype(np.float32)
