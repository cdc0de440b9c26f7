"""A detection dataset the project generates: coloured shapes on cluttered backgrounds.

Every image is a pure function of (seed, index), drawn with numpy only:

- a background of smooth colour noise or colour stripes, plus distractors
  (small blobs below the smallest object size and thin lines) and pixel noise;
- 1..max_objects non-overlapping objects of three classes (filled circle,
  filled axis-aligned rectangle, filled rotated triangle) in random colours
  that differ clearly from the background under them.

Objects never overlap (not even their boxes, with a margin), so every object
is fully visible and its box is exact: the tight bounds of its drawn pixels,
``(x0, y0, x1, y1)`` with x1 / y1 one past the last pixel column / row (so
x1 - x0 is the width in pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekit.errors import UserError

CLASS_NAMES = ("circle", "rectangle", "triangle")
_MIN_SIZE, _MAX_SIZE = 10, 48  # object extent in pixels at 128 x 128 (scaled with the image)
_MARGIN = 2  # pixels kept free between objects' boxes
_MIN_CONTRAST = 90  # least L1 distance (0..765) between an object's colour and the mean background under it


@dataclass
class Scene:
    image: np.ndarray  # uint8 (H, W, 3)
    boxes: np.ndarray  # float32 (k, 4) xyxy pixels, x1 / y1 exclusive
    labels: np.ndarray  # int64 (k,)
    instances: np.ndarray  # uint8 (H, W): 0 background, i + 1 where object i was drawn


@dataclass
class ShapesDataset:
    images: np.ndarray  # uint8 (N, H, W, 3)
    boxes: list[np.ndarray]
    labels: list[np.ndarray]
    seed: int
    class_names: tuple[str, ...] = CLASS_NAMES

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return self.images.shape[1]

    def tensor(self, indices=None):
        """Images as float32 torch tensor (n, 3, H, W) in [0, 1] (pixel / 255, the model's input)."""
        import torch

        images = self.images if indices is None else self.images[np.asarray(indices)]
        return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float().div_(255.0)


def _smooth_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Colour noise on a coarse grid, bilinearly upsampled to (size, size, 3)."""
    cells = int(rng.integers(3, 9))
    coarse = rng.uniform(0, 255, (cells, cells, 3)).astype(np.float32)
    # separable linear interpolation: weights (size, cells)
    pos = np.linspace(0, cells - 1, size)
    lo = np.minimum(np.floor(pos).astype(int), cells - 2)
    frac = (pos - lo).astype(np.float32)
    interp = np.zeros((size, cells), np.float32)
    interp[np.arange(size), lo] = 1 - frac
    interp[np.arange(size), lo + 1] = frac
    rows = np.tensordot(interp, coarse, axes=(1, 0))  # (size, cells, 3)
    return np.matmul(interp, rows)  # per row y: (size, cells) @ (cells, 3)


def _stripes(rng: np.random.Generator, size: int) -> np.ndarray:
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(6, 24) * size / 128
    axis = np.arange(size, dtype=np.float32) * np.float32(2 * np.pi / period)
    phase = np.float32(np.cos(angle)) * axis[None, :] + np.float32(np.sin(angle)) * axis[:, None]
    t = (0.5 + 0.5 * np.sin(phase))[..., None]
    a, b = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    return a + (b - a) * t


def _window(size: int, y0: float, x0: float, y1: float, x1: float):
    """Slices of the image rows/cols covering [y0, y1] x [x0, x1] and their pixel coordinates (column, row vectors)."""
    r0, r1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)) + 1, size)
    c0, c1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)) + 1, size)
    yy = np.arange(r0, r1, dtype=np.float32)[:, None]
    xx = np.arange(c0, c1, dtype=np.float32)[None, :]
    return (slice(r0, r1), slice(c0, c1)), yy, xx


def _paint_disc(img: np.ndarray, cy: float, cx: float, r: float, colour: np.ndarray) -> None:
    win, yy, xx = _window(img.shape[0], cy - r, cx - r, cy + r, cx + r)
    img[win][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = colour


def _paint_line(img: np.ndarray, y0: float, x0: float, y1: float, x1: float, width: float, colour: np.ndarray) -> None:
    half = width / 2
    win, yy, xx = _window(img.shape[0], min(y0, y1) - half, min(x0, x1) - half, max(y0, y1) + half, max(x0, x1) + half)
    dy, dx = y1 - y0, x1 - x0
    t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / (dy * dy + dx * dx + 1e-9), 0, 1)
    img[win][(yy - (y0 + t * dy)) ** 2 + (xx - (x0 + t * dx)) ** 2 <= half * half] = colour


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    img = _smooth_noise(rng, size) if rng.random() < 0.5 else _stripes(rng, size)
    scale = size / 128
    for _ in range(int(rng.integers(2, 9))):  # distractor blobs, smaller than any object
        cy, cx = rng.uniform(0, size, 2)
        _paint_disc(img, cy, cx, rng.uniform(1.5, 3.5) * scale, rng.uniform(0, 255, 3))
    for _ in range(int(rng.integers(1, 5))):  # distractor lines
        ends = rng.uniform(0, size, 4)
        _paint_line(img, *ends, width=rng.uniform(1, 2.5) * scale, colour=rng.uniform(0, 255, 3))
    return img


def _shape_mask(rng: np.random.Generator, label: int, size: int, extent: float, cy: float, cx: float):
    """A filled shape of about ``extent`` pixels centred near (cy, cx): (window slices, mask inside the window)."""
    half = extent / 2
    win, yy, xx = _window(size, cy - half, cx - half, cy + half, cx + half)
    if label == 0:  # circle
        return win, (yy - cy) ** 2 + (xx - cx) ** 2 <= half * half
    if label == 1:  # rectangle, aspect 0.6..1.6
        aspect = rng.uniform(0.6, 1.6)
        h, w = (extent, extent * aspect) if aspect < 1 else (extent / aspect, extent)
        return win, (np.abs(yy - cy) <= h / 2) & (np.abs(xx - cx) <= w / 2)
    # triangle: a slightly irregular triangle inscribed in the circle, any rotation
    angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.3, 0.3, 3)
    vy, vx = cy + np.sin(angles) * half, cx + np.cos(angles) * half
    inside = np.ones((yy.shape[0], xx.shape[1]), bool)
    for k in range(3):
        ay, ax, by, bx = vy[k], vx[k], vy[(k + 1) % 3], vx[(k + 1) % 3]
        # the third vertex fixes which side of edge k is inside
        side = (bx - ax) * (vy[(k + 2) % 3] - ay) - (by - ay) * (vx[(k + 2) % 3] - ax)
        inside &= ((bx - ax) * (yy - ay) - (by - ay) * (xx - ax)) * np.sign(side) >= 0
    return win, inside


def _tight_box(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)


def _overlaps(box: np.ndarray, boxes: list[np.ndarray]) -> bool:
    for other in boxes:
        if box[0] < other[2] + _MARGIN and other[0] < box[2] + _MARGIN and box[1] < other[3] + _MARGIN and other[1] < box[3] + _MARGIN:
            return True
    return False


def render_scene(seed: int, index: int, image_size: int = 128, max_objects: int = 4) -> Scene:
    """Image ``index`` of the dataset with ``seed`` (the same pixels every time)."""
    rng = np.random.default_rng([seed, index])
    size = image_size
    img = _background(rng, size)
    instances = np.zeros((size, size), np.uint8)
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    scale = size / 128
    wanted = int(rng.integers(1, max_objects + 1))
    for _ in range(40):  # placement attempts
        if len(boxes) == wanted:
            break
        label = int(rng.integers(0, len(CLASS_NAMES)))
        extent = rng.uniform(_MIN_SIZE, _MAX_SIZE) * scale
        half = extent / 2 + 1
        cy, cx = rng.uniform(half, size - half, 2)
        win, mask = _shape_mask(rng, label, size, extent, cy, cx)
        if mask.sum() < 16 * scale * scale:
            continue
        box = _tight_box(mask) + np.array([win[1].start, win[0].start] * 2, np.float32)
        if _overlaps(box, boxes):
            continue
        patch = img[win]
        under = patch[mask].mean(axis=0)
        colour = rng.uniform(0, 255, 3)
        for _ in range(8):  # keep the object visible against the background under it
            if np.abs(colour - under).sum() >= _MIN_CONTRAST:
                break
            colour = rng.uniform(0, 255, 3)
        else:
            colour = np.where(under > 127, 0.0, 255.0)
        patch[mask] = colour
        instances[win][mask] = len(boxes) + 1
        boxes.append(box)
        labels.append(label)
    img += (rng.random(img.shape, dtype=np.float32) - np.float32(0.5)) * np.float32(20)  # sensor-like noise over everything (std ~6)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    box_array = np.stack(boxes).astype(np.float32) if boxes else np.zeros((0, 4), np.float32)
    return Scene(image, box_array, np.asarray(labels, np.int64), instances)


def make_dataset(n: int, seed: int, image_size: int = 128, max_objects: int = 4) -> ShapesDataset:
    """``n`` images (uint8 N, H, W, 3) with their boxes and labels, deterministic from ``seed``."""
    if n < 1 or image_size < 32 or max_objects < 1:
        raise UserError(f"make_dataset needs n >= 1, image_size >= 32 and max_objects >= 1, got n={n}, image_size={image_size}, max_objects={max_objects}")
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    boxes, labels = [], []
    for i in range(n):
        scene = render_scene(seed, i, image_size, max_objects)
        images[i] = scene.image
        boxes.append(scene.boxes)
        labels.append(scene.labels)
    return ShapesDataset(images, boxes, labels, seed)
