"""shapes_vqa: a localization answer names the quadrant where the asked-for colour is."""

import numpy as np

from edgekit.models import model_info
from edgekit.models.datasets import generate
from edgekit.models.shapes_vqa import CELLS, COLOURS, GROUP_NAMES, QUADRANTS, VOCAB, decode


def _colour_cell(image: np.ndarray, rgb) -> tuple[int, int]:
    """(row, col) of the grid cell holding the most pixels of colour ``rgb``; image is (3, H, W) in [0, 1]."""
    near = (np.abs(image * 255 - np.asarray(rgb, np.float32)[:, None, None]) < 30).all(0)
    size = image.shape[1] // CELLS
    counts = near[: size * CELLS, : size * CELLS].reshape(CELLS, size, CELLS, size).sum((1, 3))
    return divmod(int(counts.argmax()), CELLS)


def test_localization_answers_name_the_quadrant_of_the_asked_colour():
    info = model_info("tiny_vlm")
    data = generate("shapes_vqa", 120, 7, info.inputs, info.dims)
    words = {i: w for w, i in VOCAB.items()}
    kinds = {name: 0 for name in GROUP_NAMES}
    for image, ids, label, group in zip(data.arrays["pixel_values"], data.arrays["input_ids"], data.labels, data.groups):
        kinds[GROUP_NAMES[group]] += 1
        if GROUP_NAMES[group] != "localization":
            continue
        question = decode(ids).split()
        row, col = _colour_cell(image, COLOURS[question[-3]])  # "... the <colour> <shape> ?"; colours are unique per scene
        assert words[int(label)] == QUADRANTS[2 * (row >= CELLS // 2) + (col >= CELLS // 2)]
    assert kinds == {"localization": 60, "other": 60}
