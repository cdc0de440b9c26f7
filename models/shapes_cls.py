"""``shapes_cls``: one shape on a cluttered background, six classes (shape x size).

Classes: ``{circle, rectangle, triangle} x {small, large}``; small objects span
18-26% of the image side, large ones 36-48% (a gap between the two keeps
labels unambiguous). A large object covers at most about a quarter of the
patches (e.g. <= 16 of 64 at 64x64 with patch 8) and a small one a handful, so
most tokens are background that can be cut — but the label is read from the
object's own tokens, so a token compressor that loses them loses accuracy.

Drawn with the numpy helpers of :mod:`edgekit.models.shapes_detection`
(backgrounds of smooth colour noise or stripes with distractor blobs and lines,
filled shapes in a colour that contrasts with the background under them, sensor
noise). Every image is a pure function of (seed, index, image size).
"""

from __future__ import annotations

import numpy as np

from edgekit.errors import UserError
from edgekit.models import shapes_detection as sd
from edgekit.models.datasets import SynthData, register_dataset

SHAPES = sd.CLASS_NAMES
SIZES = {"small": (0.18, 0.26), "large": (0.36, 0.48)}  # object extent as a share of the image side
CLASS_NAMES = tuple(f"{size} {shape}" for size in SIZES for shape in SHAPES)


def render(seed: int, index: int, size: int) -> tuple[np.ndarray, int]:
    """Image ``index`` (uint8 H, W, 3) and its class id."""
    rng = np.random.default_rng([seed, index, 7])
    label = int(rng.integers(len(CLASS_NAMES)))
    shape, big = label % len(SHAPES), label // len(SHAPES)
    img = sd._background(rng, size)
    lo, hi = list(SIZES.values())[big]
    extent = rng.uniform(lo, hi) * size
    half = extent / 2 + 1
    cy, cx = rng.uniform(half, size - half, 2)
    win, mask = sd._shape_mask(rng, shape, size, extent, cy, cx)
    patch = img[win]
    under = patch[mask].mean(axis=0)
    colour = rng.uniform(0, 255, 3)
    for _ in range(8):  # the object must stand out from what lies under it
        if np.abs(colour - under).sum() >= sd._MIN_CONTRAST:
            break
        colour = rng.uniform(0, 255, 3)
    else:
        colour = np.where(under > 127, 0.0, 255.0)
    patch[mask] = colour
    img += (rng.random(img.shape, dtype=np.float32) - np.float32(0.5)) * np.float32(20)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), label


@register_dataset("shapes_cls")
def shapes_cls(n: int, seed: int, inputs, dims) -> SynthData:
    """One circle / rectangle / triangle, small or large, on clutter: 6 classes."""
    images = [s for s in inputs if len(s.shape) == 4 and s.dtype in ("float32", "float16")]
    if len(images) != 1:
        raise UserError("shapes_cls makes one image input (float NCHW); use an image classifier with a single image input such as zoo:vit_shapes")
    spec = images[0]
    _, channels, h, w = spec.concrete_shape(dims)
    if channels != 3 or h != w or h < 16:
        raise UserError(f"shapes_cls draws square RGB images of side >= 16, but input {spec.name} is {channels}x{h}x{w}; use a 3xHxH input")
    pixels = np.empty((n, 3, h, w), np.float32)
    labels = np.empty(n, np.int64)
    for i in range(n):
        img, labels[i] = render(seed, i, h)
        pixels[i] = img.transpose(2, 0, 1) / np.float32(255)
    return SynthData(arrays={spec.name: pixels}, labels=labels, groups=labels // len(SHAPES), group_names=tuple(SIZES),
                     info={"classes": CLASS_NAMES})
