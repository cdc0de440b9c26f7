"""CenterNet ("Objects as Points") training targets, loss, decoding and AP50.

The detector outputs one tensor (B, C + 4, H / s, W / s): C heatmap logits,
box size (w, h) and centre offset (x, y), both in output-stride pixels. An
object is a Gaussian peak on its class's heatmap at the cell holding its box
centre; the size and offset are read at that cell.

Boxes are xyxy in input pixels. Decoding and AP work on numpy arrays so the
dequantized outputs of the integer reference / FPGA go through the same code
as the float model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgekit.errors import UserError

SIZE_WEIGHT = 0.1  # CenterNet's weight of the size L1 loss
MIN_OVERLAP = 0.7  # the radius rule: a box shifted by the radius keeps IoU >= 0.7 with the truth


# -- targets -------------------------------------------------------------------------

def gaussian_radius(height: float, width: float, min_overlap: float = MIN_OVERLAP) -> float:
    """CenterNet's radius rule (from CornerNet): the smallest of three corner-shift cases.

    Each case bounds how far a predicted box's corners may move (one corner in,
    both out, both in) while its IoU with the true box stays >= min_overlap; the
    three quadratics are solved as in the reference implementation.
    """
    h, w, o = height, width, min_overlap
    b1, c1 = h + w, w * h * (1 - o) / (1 + o)
    r1 = (b1 + math.sqrt(max(b1 * b1 - 4 * c1, 0.0))) / 2
    b2, c2 = 2 * (h + w), (1 - o) * w * h
    r2 = (b2 + math.sqrt(max(b2 * b2 - 16 * c2, 0.0))) / 2
    a3, b3, c3 = 4 * o, -2 * o * (h + w), (o - 1) * w * h
    r3 = (b3 + math.sqrt(max(b3 * b3 - 4 * a3 * c3, 0.0))) / 2
    return min(r1, r2, r3)


def _splat(heatmap: np.ndarray, cx: int, cy: int, radius: int) -> None:
    """Max a Gaussian of sigma (2r + 1) / 6 centred at (cx, cy) into ``heatmap`` (H, W)."""
    sigma = (2 * radius + 1) / 6
    h, w = heatmap.shape
    y0, y1 = max(cy - radius, 0), min(cy + radius + 1, h)
    x0, x1 = max(cx - radius, 0), min(cx + radius + 1, w)
    yy = np.arange(y0, y1)[:, None] - cy
    xx = np.arange(x0, x1)[None, :] - cx
    g = np.exp(-(xx * xx + yy * yy) / (2 * sigma * sigma)).astype(np.float32)
    np.maximum(heatmap[y0:y1, x0:x1], g, out=heatmap[y0:y1, x0:x1])


@dataclass
class Targets:
    heatmap: torch.Tensor  # (B, C, Ho, Wo) in [0, 1], exactly 1 at object centres
    wh: torch.Tensor  # (B, M, 2) box width, height in output pixels
    offset: torch.Tensor  # (B, M, 2) centre minus its cell (x, y), in [0, 1)
    indices: torch.Tensor  # (B, M) int64 flat cell index y * Wo + x
    mask: torch.Tensor  # (B, M) 1 for real objects, 0 for padding


def encode_targets(
    boxes: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    num_classes: int,
    image_size: int | tuple[int, int],
    stride: int = 4,
) -> Targets:
    """Training targets for a batch: ``boxes[i]`` (k, 4) xyxy pixels, ``labels[i]`` (k,) class ids."""
    ih, iw = (image_size, image_size) if isinstance(image_size, int) else image_size
    ho, wo = ih // stride, iw // stride
    batch, most = len(boxes), max([len(b) for b in boxes] + [1])
    heatmap = np.zeros((batch, num_classes, ho, wo), np.float32)
    wh = np.zeros((batch, most, 2), np.float32)
    offset = np.zeros((batch, most, 2), np.float32)
    indices = np.zeros((batch, most), np.int64)
    mask = np.zeros((batch, most), np.float32)
    for i, (image_boxes, image_labels) in enumerate(zip(boxes, labels)):
        for j, (box, label) in enumerate(zip(np.asarray(image_boxes, np.float64), np.asarray(image_labels))):
            if not 0 <= label < num_classes:
                raise UserError(f"label {label} is outside 0..{num_classes - 1}; fix num_classes or the labels")
            bw, bh = (box[2] - box[0]) / stride, (box[3] - box[1]) / stride
            cx, cy = (box[0] + box[2]) / 2 / stride, (box[1] + box[3]) / 2 / stride
            ix, iy = min(max(math.floor(cx), 0), wo - 1), min(max(math.floor(cy), 0), ho - 1)
            radius = max(0, int(gaussian_radius(math.ceil(bh), math.ceil(bw))))
            _splat(heatmap[i, int(label)], ix, iy, radius)
            wh[i, j] = (bw, bh)
            offset[i, j] = (cx - ix, cy - iy)
            indices[i, j] = iy * wo + ix
            mask[i, j] = 1
    as_t = torch.from_numpy
    return Targets(as_t(heatmap), as_t(wh), as_t(offset), as_t(indices), as_t(mask))


# -- loss ----------------------------------------------------------------------------

@dataclass
class CenterNetLoss:
    total: torch.Tensor
    heatmap: torch.Tensor
    size: torch.Tensor
    offset: torch.Tensor


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss on heatmap logits, normalised by the number of objects."""
    pos = target.eq(1).float()
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = torch.sigmoid(logits)
    pos_loss = (log_p * (1 - p) ** alpha * pos).sum()
    neg_loss = (log_not_p * p**alpha * (1 - target) ** beta * (1 - pos)).sum()
    return -(pos_loss + neg_loss) / pos.sum().clamp(min=1.0)


def _gather(feature: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) at flat cell ``indices`` (B, M) -> (B, M, 2)."""
    b, c = feature.shape[:2]
    flat = feature.reshape(b, c, -1)
    return flat.gather(2, indices.unsqueeze(1).expand(b, c, indices.shape[1])).transpose(1, 2)


def centernet_loss(output: torch.Tensor, targets: Targets) -> CenterNetLoss:
    """Focal heatmap loss + 0.1 * L1 size + L1 offset (the L1s averaged over objects)."""
    c = targets.heatmap.shape[1]
    if output.shape[1] != c + 4 or output.shape[2:] != targets.heatmap.shape[2:]:
        raise UserError(f"detector output {tuple(output.shape)} does not match targets for {c} classes at {tuple(targets.heatmap.shape[2:])}; check num_classes and the stride")
    heat = focal_loss(output[:, :c], targets.heatmap)
    mask = targets.mask.unsqueeze(2)
    count = targets.mask.sum().clamp(min=1.0)
    size = (torch.abs(_gather(output[:, c : c + 2], targets.indices) - targets.wh) * mask).sum() / count
    off = (torch.abs(_gather(output[:, c + 2 : c + 4], targets.indices) - targets.offset) * mask).sum() / count
    return CenterNetLoss(heat + SIZE_WEIGHT * size + off, heat, size, off)


# -- decoding ------------------------------------------------------------------------

@dataclass
class Detections:
    boxes: np.ndarray  # (k, 4) xyxy input pixels
    scores: np.ndarray  # (k,) in (0, 1)
    labels: np.ndarray  # (k,) int64


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|


def _max3x3(x: np.ndarray) -> np.ndarray:
    """3x3 max filter (stride 1, -inf padding) over the last two axes."""
    padded = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)], constant_values=-np.inf)
    h, w = x.shape[-2:]
    out = padded[..., 0:h, 0:w]
    for dy in range(3):
        for dx in range(3):
            out = np.maximum(out, padded[..., dy : dy + h, dx : dx + w])
    return out


def decode_arrays(heatmap_logits: np.ndarray, wh: np.ndarray, offset: np.ndarray, k: int = 50, stride: int = 4) -> list[Detections]:
    """Detections from the three head outputs (numpy, e.g. dequantized integer outputs).

    Shapes (B, C, H, W), (B, 2, H, W), (B, 2, H, W). Peaks are cells equal to
    their 3x3 neighbourhood maximum (the CenterNet NMS); the top ``k`` over all
    classes and cells are kept (ties: lower class, then lower cell first).
    """
    logits = np.asarray(heatmap_logits, np.float64)
    wh, offset = np.asarray(wh, np.float64), np.asarray(offset, np.float64)
    b, _, h, w = logits.shape
    peaks = np.where(logits == _max3x3(logits), logits, -np.inf).reshape(b, -1)
    results = []
    for i in range(b):
        kk = min(k, int(np.isfinite(peaks[i]).sum()))
        order = np.argsort(-peaks[i], kind="stable")[:kk]
        labels, cell = order // (h * w), order % (h * w)
        ys, xs = cell // w, cell % w
        cx = (xs + offset[i, 0, ys, xs]) * stride
        cy = (ys + offset[i, 1, ys, xs]) * stride
        bw, bh = wh[i, 0, ys, xs] * stride, wh[i, 1, ys, xs] * stride
        boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1).astype(np.float32)
        results.append(Detections(boxes, _sigmoid(peaks[i, order]).astype(np.float32), labels.astype(np.int64)))
    return results


def decode(output, k: int = 50, stride: int = 4) -> list[Detections]:
    """Detections from a detector output (B, C + 4, H, W), torch or numpy: sigmoid, 3x3 peak NMS, top-k."""
    if isinstance(output, torch.Tensor):
        output = output.detach().cpu().numpy()
    output = np.asarray(output)
    if output.ndim != 4 or output.shape[1] < 5:
        raise UserError(f"a CenterNet output is (batch, classes + 4, H, W), got shape {output.shape}")
    c = output.shape[1] - 4
    return decode_arrays(output[:, :c], output[:, c : c + 2], output[:, c + 2 : c + 4], k, stride)


# -- AP50 ------------------------------------------------------------------------------

def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of xyxy boxes."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope (VOC 2010+ all-point interpolation)."""
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.flatnonzero(r[1:] != r[:-1])
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def class_average_precisions(
    detections: Sequence[Detections],
    gt_boxes: Sequence[np.ndarray],
    gt_labels: Sequence[np.ndarray],
    num_classes: int,
    iou_threshold: float = 0.5,
) -> list[float]:
    """Per-class AP (nan for a class with no ground truth).

    VOC matching: a class's detections are taken in descending score order
    (ties keep image order); each is compared with the true box of its class
    in its image that it overlaps most, and is a true positive if that IoU
    reaches the threshold and the box is not matched yet, else a false
    positive (a duplicate of a matched box counts as false).
    """
    if not len(detections) == len(gt_boxes) == len(gt_labels):
        raise UserError(f"AP needs one detection list per image: got {len(detections)} detections, {len(gt_boxes)} box and {len(gt_labels)} label lists")
    aps = []
    for cls in range(num_classes):
        truth = [np.asarray(b, np.float64).reshape(-1, 4)[np.asarray(l) == cls] for b, l in zip(gt_boxes, gt_labels)]
        total = sum(len(t) for t in truth)
        if total == 0:
            aps.append(float("nan"))
            continue
        entries = []  # (score, image, box)
        for i, det in enumerate(detections):
            keep = np.asarray(det.labels) == cls
            for score, box in zip(np.asarray(det.scores)[keep], np.asarray(det.boxes)[keep]):
                entries.append((float(score), i, box))
        entries.sort(key=lambda e: -e[0])  # sort is stable: ties keep image order
        matched = [np.zeros(len(t), bool) for t in truth]
        tp = np.zeros(len(entries))
        for n, (_, i, box) in enumerate(entries):
            if len(truth[i]) == 0:
                continue
            ious = box_iou(box[None], truth[i])[0]
            best = int(np.argmax(ious))
            if ious[best] >= iou_threshold and not matched[i][best]:
                matched[i][best] = True
                tp[n] = 1
        hits = np.cumsum(tp)
        ranks = np.arange(1, len(entries) + 1)
        aps.append(_average_precision(hits / total, hits / ranks) if entries else 0.0)
    return aps


def average_precision_50(
    detections: Sequence[Detections],
    gt_boxes: Sequence[np.ndarray],
    gt_labels: Sequence[np.ndarray],
    num_classes: int,
) -> float:
    """VOC-style AP at IoU 0.5 (all-point interpolation), mean over classes that have ground truth."""
    aps = [a for a in class_average_precisions(detections, gt_boxes, gt_labels, num_classes, 0.5) if not math.isnan(a)]
    return float(np.mean(aps)) if aps else 0.0


# -- training and evaluation --------------------------------------------------------

@dataclass
class TrainLog:
    losses: list[float] = field(default_factory=list)  # total loss of every step
    seconds: float = 0.0

    def mean_loss(self, first: int, last: int) -> float:
        return float(np.mean(self.losses[first:last]))


def _flip_batch(images: torch.Tensor, boxes: list[np.ndarray], flips: np.ndarray) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Mirror the images (and their boxes) where ``flips`` is True."""
    width = images.shape[-1]
    if flips.any():
        images = images.clone()
        images[flips] = images[flips].flip(-1)
    out = []
    for box, flip in zip(boxes, flips):
        box = np.asarray(box, np.float32)
        out.append(np.stack([width - box[:, 2], box[:, 1], width - box[:, 0], box[:, 3]], 1) if flip and len(box) else box)
    return images, out


def train_detector(
    model: nn.Module,
    dataset,
    steps: int,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    augment: Literal["none", "flip"] = "flip",
    weight_decay: float = 1e-4,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainLog:
    """AdamW with a short warm-up and cosine decay on a ``ShapesDataset``; deterministic given ``seed``.

    Batches are drawn from per-epoch permutations of the dataset; ``augment``
    "flip" mirrors half of the images left-right.
    """
    if steps < 1 or batch_size < 1:
        raise UserError(f"train_detector needs steps >= 1 and batch_size >= 1, got {steps} and {batch_size}")
    if augment not in ("none", "flip"):
        raise UserError(f"augment must be 'none' or 'flip', got {augment!r}")
    rng = np.random.default_rng(seed)
    num_classes, size = dataset.num_classes, dataset.image_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, foreach=True)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    )
    log, order, cursor = TrainLog(), rng.permutation(len(dataset)), 0
    start = time.perf_counter()
    model.train()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for step in range(steps):
            if cursor + batch_size > len(order):
                order, cursor = rng.permutation(len(dataset)), 0
            idx = order[cursor : cursor + batch_size]
            cursor += batch_size
            images, boxes = dataset.tensor(idx), [dataset.boxes[i] for i in idx]
            if augment == "flip":
                images, boxes = _flip_batch(images, boxes, rng.random(len(idx)) < 0.5)
            targets = encode_targets(boxes, [dataset.labels[i] for i in idx], num_classes, size, model_stride(model))
            loss = centernet_loss(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            schedule.step()
            log.losses.append(float(loss.total.detach()))
            if on_step is not None:
                on_step(step, log.losses[-1])
    log.seconds = time.perf_counter() - start
    model.eval()
    return log


def model_stride(model: nn.Module) -> int:
    return int(getattr(model, "stride", 4))


@torch.no_grad()
def detect(model: nn.Module, dataset, batch_size: int = 32, k: int = 50) -> list[Detections]:
    """Run ``model`` (eval mode) over a ``ShapesDataset`` in batches and decode."""
    model.eval()
    out: list[Detections] = []
    for start in range(0, len(dataset), batch_size):
        images = dataset.tensor(range(start, min(start + batch_size, len(dataset))))
        out += decode(model(images), k, model_stride(model))
    return out


def evaluate_ap50(model: nn.Module, dataset, batch_size: int = 32, k: int = 50) -> float:
    """AP50 of ``model`` on a ``ShapesDataset``."""
    detections = detect(model, dataset, batch_size, k)
    return average_precision_50(detections, dataset.boxes, dataset.labels, dataset.num_classes)
