"""A visual question answering dataset the project generates: questions about coloured shapes.

Why it exists: visual token pruning for vision-language models is judged on
questions that need the *whole* image. FastV-style pruning keeps the image
tokens nearest the question (the bottom rows) and so loses objects in the top
rows; a localization question about such an object then fails. Every sample
here is a scene, one question and one answer word:

- the scene: 2..4 filled shapes (circle / rectangle / triangle, drawn with the
  functions of :mod:`edgekit.models.shapes_detection`) in five named colours,
  one object per cell of a 4 x 4 grid of cells (any cell, top rows included), on
  a plain background with faint colour noise, a few small grey blobs and pixel
  noise. No colour appears twice, so every question has one answer (and
  finding "the red triangle" is learnable from colour alone in a few minutes of
  CPU training, while "what colour is the circle ?" still needs the shape).
- the question: token ids of a small fixed vocabulary (:data:`VOCAB`), left-padded
  to :data:`QUESTION_LENGTH` so the last token is always ``?`` (the query that
  decodes the answer, and the one FastV scores image tokens with).
- the label: the vocabulary id of the answer word; a model answers with
  next-token logits over the vocabulary.

Question kinds (``groups``): 0 ``localization`` — "which quadrant holds the red
triangle ?" (four quadrant words); 1 ``other`` — "what colour is the circle ?",
"how many triangle are there ?", "is there a blue rectangle ?". Half of the
samples are localization questions.
"""

from __future__ import annotations

import numpy as np

from edgekit.artifact import TensorSpec
from edgekit.errors import UserError
from edgekit.models.datasets import SynthData, register_dataset
from edgekit.models.shapes_detection import CLASS_NAMES, _paint_disc, _shape_mask

COLOURS = {  # name -> RGB; far apart from each other and from the grey background
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 225),
    "yellow": (230, 205, 40),
    "white": (245, 245, 245),
}
SHAPES = CLASS_NAMES  # circle, rectangle, triangle
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
NUMBERS = ("zero", "one", "two", "three", "four")
_WORDS = (
    "<pad>", "?", "which", "quadrant", "holds", "the", "what", "colour", "is", "how", "many", "are", "there", "a",
    *COLOURS, *SHAPES, *QUADRANTS, *NUMBERS, "yes", "no",
)
VOCAB: dict[str, int] = {w: i for i, w in enumerate(_WORDS)}
VOCAB_SIZE = len(VOCAB)
QUESTION_LENGTH = 8
GROUP_NAMES = ("localization", "other")
CELLS = 4  # the scene is a CELLS x CELLS grid of cells, at most one object per cell


def encode(question: str) -> np.ndarray:
    """Token ids of ``question`` (words split on spaces), left-padded to QUESTION_LENGTH."""
    ids = [VOCAB[w] for w in question.split()]
    if len(ids) > QUESTION_LENGTH:
        raise UserError(f"question {question!r} has {len(ids)} words; at most {QUESTION_LENGTH} fit")
    return np.array([VOCAB["<pad>"]] * (QUESTION_LENGTH - len(ids)) + ids, np.int64)


def decode(ids) -> str:
    words = {i: w for w, i in VOCAB.items()}
    return " ".join(words[int(i)] for i in ids if int(i) != VOCAB["<pad>"])


def _scene(rng: np.random.Generator, size: int):
    """An image (H, W, 3 float) and its objects as (colour, shape, cell_row, cell_col)."""
    base = rng.uniform(70, 130)
    img = np.full((size, size, 3), base, np.float32)
    img += rng.uniform(-12, 12, (1, 1, 3)).astype(np.float32)  # a faint tint
    cell = size / CELLS
    for _ in range(int(rng.integers(0, 4))):  # small grey blobs: light clutter, never mistaken for an object
        cy, cx = rng.uniform(0, size, 2)
        _paint_disc(img, cy, cx, rng.uniform(0.04, 0.07) * size, np.full(3, base + rng.uniform(-35, 35)))
    count = int(rng.integers(2, 5))
    cells = rng.choice(CELLS * CELLS, size=count, replace=False)
    colours = rng.choice(len(COLOURS), size=count, replace=False)  # one object per colour
    shapes = rng.integers(0, len(SHAPES), size=count)
    names = list(COLOURS)
    objects = []
    for c, colour_id, shape in zip(cells, colours, shapes):
        colour, shape = names[int(colour_id)], int(shape)
        row, col = divmod(int(c), CELLS)
        extent = rng.uniform(0.6, 0.85) * cell
        slack = (cell - extent) / 2
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack) * 0.8
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack) * 0.8
        win, mask = _shape_mask(rng, shape, size, extent, cy, cx)
        rgb = np.asarray(COLOURS[colour], np.float32) + rng.uniform(-15, 15, 3).astype(np.float32)
        img[win][mask] = rgb
        objects.append((colour, shape, row, col))
    img += (rng.random(img.shape, dtype=np.float32) - np.float32(0.5)) * np.float32(16)
    return np.clip(img, 0, 255) / np.float32(255), objects


def _question(rng: np.random.Generator, objects, localization: bool) -> tuple[str, str]:
    """(question, answer word) about the scene."""
    if localization:
        colour, shape, row, col = objects[int(rng.integers(len(objects)))]
        half = CELLS // 2
        return f"which quadrant holds the {colour} {SHAPES[shape]} ?", QUADRANTS[2 * (row >= half) + (col >= half)]
    shapes = [o[1] for o in objects]
    kind = int(rng.integers(3))
    unique = [o for o in objects if shapes.count(o[1]) == 1]
    if kind == 0 and unique:  # colour of a shape that appears once
        colour, shape, _, _ = unique[int(rng.integers(len(unique)))]
        return f"what colour is the {SHAPES[shape]} ?", colour
    if kind <= 1:  # count (also the fallback when no shape is unique)
        shape = int(rng.integers(len(SHAPES)))
        return f"how many {SHAPES[shape]} are there ?", NUMBERS[shapes.count(shape)]
    present = {(o[0], o[1]) for o in objects}
    if rng.random() < 0.5:
        colour, shape = sorted(present)[int(rng.integers(len(present)))]
        return f"is there a {colour} {SHAPES[shape]} ?", "yes"
    absent = [(c, s) for c in COLOURS for s in range(len(SHAPES)) if (c, s) not in present]
    colour, shape = absent[int(rng.integers(len(absent)))]
    return f"is there a {colour} {SHAPES[shape]} ?", "no"


@register_dataset("shapes_vqa")
def shapes_vqa(n: int, seed: int, inputs: list[TensorSpec], dims: dict[str, int]) -> SynthData:
    """Questions about coloured shapes (localization and other), answered by one word."""
    image = next((s for s in inputs if s.name == "pixel_values"), None)
    text = next((s for s in inputs if s.name == "input_ids"), None)
    if image is None or text is None:
        raise UserError("shapes_vqa feeds a vision-language model with inputs pixel_values and input_ids; use zoo:tiny_vlm")
    _, channels, height, width = image.concrete_shape(dims)
    qlen = text.concrete_shape(dims)[-1]
    if channels != 3 or height != width or height < 16:
        raise UserError(f"shapes_vqa draws square RGB images of at least 16 pixels, but pixel_values is {channels}x{height}x{width}")
    if qlen != QUESTION_LENGTH:
        raise UserError(f"shapes_vqa questions are {QUESTION_LENGTH} tokens long, but input_ids holds {qlen}; set the qlen dim to {QUESTION_LENGTH}")
    pixels = np.empty((n, 3, height, width), np.float32)
    ids = np.empty((n, QUESTION_LENGTH), np.int64)
    labels = np.empty(n, np.int64)
    groups = np.empty(n, np.int64)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        img, objects = _scene(rng, height)
        localization = i % 2 == 0
        question, answer = _question(rng, objects, localization)
        pixels[i] = img.transpose(2, 0, 1)
        ids[i] = encode(question)
        labels[i] = VOCAB[answer]
        groups[i] = 0 if localization else 1
    return SynthData({"pixel_values": pixels, "input_ids": ids}, labels, groups, GROUP_NAMES, {"vocab": dict(VOCAB)})
