"""``digits_canvas``: scikit-learn's handwritten digits, enlarged and placed on a larger noisy canvas.

Each sample takes one real 8x8 digit, enlarges it to ``scale`` x its size
(bilinear, so strokes stay smooth), tints it and drops it at a random place on
a canvas of smooth colour noise. At 64x64 with a scale of 4 the digit covers
32x32 pixels: a quarter of the image, 16 of 64 patch tokens of 8x8. Most tokens
are background a token compressor can cut, while the label lives in the digit's
own tokens: what token pruning and merging have to get right.

Two datasets split the 1797 digits by index so evaluation never sees a training
glyph: ``digits_canvas`` draws from the digits with ``index % 5 != 0`` (1437),
``digits_canvas_test`` from the others (360). Every image is a pure function of
(seed, sample index, image size).
"""

from __future__ import annotations

import numpy as np

from edgekit.errors import UserError
from edgekit.models.datasets import SynthData, register_dataset
from edgekit.models.shapes_detection import _smooth_noise

SCALE = 4  # digit side in pixels = 8 * SCALE * (image size / 64)


def _digits(held_out: bool) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    pick = (np.arange(len(d.target)) % 5 == 0) == held_out
    return (d.images[pick] / 16.0).astype(np.float32), d.target[pick].astype(np.int64)


def _enlarge(glyph: np.ndarray, side: int) -> np.ndarray:
    """Bilinear resize of an (8, 8) glyph to (side, side)."""
    pos = (np.arange(side) + 0.5) * 8 / side - 0.5
    i0 = np.clip(np.floor(pos).astype(int), 0, 7)
    i1 = np.clip(i0 + 1, 0, 7)
    w = np.clip(pos - i0, 0, 1)
    rows = glyph[i0] * (1 - w)[:, None] + glyph[i1] * w[:, None]
    return rows[:, i0] * (1 - w)[None, :] + rows[:, i1] * w[None, :]


def render(seed: int, index: int, size: int, glyphs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Image ``index`` (float32 (3, size, size) in [0, 1]) and its digit."""
    rng = np.random.default_rng([seed, index, 11])
    k = int(rng.integers(len(labels)))
    side = max(8, round(8 * SCALE * size / 64))
    canvas = _smooth_noise(rng, size).astype(np.float32) / 255.0 * 0.6  # darker background, ink stands out
    ink = rng.uniform(0.6, 1.0, 3).astype(np.float32)
    alpha = _enlarge(glyphs[k], side)[..., None]
    y, x = (int(v) for v in rng.integers(0, size - side + 1, 2))
    patch = canvas[y : y + side, x : x + side]
    canvas[y : y + side, x : x + side] = patch * (1 - alpha) + ink * alpha
    canvas += rng.normal(0, 0.02, canvas.shape).astype(np.float32)
    return np.clip(canvas, 0, 1).transpose(2, 0, 1), int(labels[k])


def _generate(n: int, seed: int, inputs, dims, held_out: bool) -> SynthData:
    spec = inputs[0]
    shape = spec.concrete_shape({**dims, "batch": n})
    if len(inputs) != 1 or len(shape) != 4 or shape[1] != 3 or shape[2] != shape[3] or shape[2] < 16:
        raise UserError(f"digits_canvas makes square RGB images (batch, 3, S, S), S >= 16, for one input; the model takes {spec.name} {spec.shape}")
    glyphs, digits = _digits(held_out)
    images = np.empty((n, 3, shape[2], shape[2]), np.float32)
    labels = np.empty(n, np.int64)
    for i in range(n):
        images[i], labels[i] = render(seed, i, shape[2], glyphs, digits)
    return SynthData({spec.name: images}, labels, info={"glyphs": len(digits)})


@register_dataset("digits_canvas")
def digits_canvas(n, seed, inputs, dims):
    """Real handwritten digits (1437 training glyphs), enlarged, on a noisy canvas: 10 classes."""
    return _generate(n, seed, inputs, dims, held_out=False)


@register_dataset("digits_canvas_test")
def digits_canvas_test(n, seed, inputs, dims):
    """digits_canvas on the 360 held-out glyphs, for evaluation."""
    return _generate(n, seed, inputs, dims, held_out=True)
