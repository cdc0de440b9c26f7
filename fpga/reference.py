"""The Python integer reference: the ground truth the generated hardware must equal.

Runs an :class:`~edgekit.fpga.ir.Graph` on one uint8 image with numpy int64
arithmetic, following the IR's integer rules exactly (see ``edgekit.fpga.ir``).
It is written for clarity, not speed: a 128x128 CoDeNet takes about a second.
"""

from __future__ import annotations

import numpy as np

from edgekit.errors import UserError
from edgekit.fpga.ir import Graph, Layer


def requantize(acc: np.ndarray, multiplier: np.ndarray, shift: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """clamp((acc * M + 2^(S-1)) >> S, lo, hi) per channel (axis 0); >> floors."""
    m = multiplier.astype(np.int64).reshape(-1, 1, 1)
    s = shift.astype(np.int64).reshape(-1, 1, 1)
    out = (acc * m + (np.int64(1) << (s - 1))) >> s
    return np.clip(out, lo, hi)


def _pad(x: np.ndarray, p: int) -> np.ndarray:
    return np.pad(x, ((0, 0), (p, p), (p, p))) if p else x


def conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride: int, groups: int) -> np.ndarray:
    """Integer conv with zero padding kernel // 2; returns the int64 accumulator."""
    cout, cin_g, k, _ = weight.shape
    cin, h, w = x.shape
    p = k // 2
    ho, wo = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
    xp = _pad(x.astype(np.int64), p)
    w64 = weight.astype(np.int64)
    acc = np.broadcast_to(bias.astype(np.int64).reshape(-1, 1, 1), (cout, ho, wo)).copy()
    cout_g = cout // groups
    for dy in range(k):
        for dx in range(k):
            window = xp[:, dy : dy + stride * (ho - 1) + 1 : stride, dx : dx + stride * (wo - 1) + 1 : stride]
            for g in range(groups):
                xs = window[g * cin_g : (g + 1) * cin_g].reshape(cin_g, -1)
                ws = w64[g * cout_g : (g + 1) * cout_g, :, dy, dx]
                acc[g * cout_g : (g + 1) * cout_g] += (ws @ xs).reshape(cout_g, ho, wo)
    return acc


def deform_dw(x: np.ndarray, dilation: np.ndarray, weight: np.ndarray, bias: np.ndarray, bound: int) -> np.ndarray:
    """Square-window depthwise 3x3: tap (i, j) of pixel (y, x) reads x[c, y+i*d, x+j*d], 0 outside."""
    c, h, w = x.shape
    d = dilation.reshape(h, w).astype(np.int64)
    if d.min(initial=0) < 0 or d.max(initial=0) > bound:
        raise UserError(f"dilation map outside [0, {bound}]; the offset conv's clamp is wrong")
    xp = _pad(x.astype(np.int64), bound)
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    acc = np.broadcast_to(bias.astype(np.int64).reshape(-1, 1, 1), (c, h, w)).copy()
    for i in (-1, 0, 1):
        for j in (-1, 0, 1):
            tap = xp[:, ys + i * d + bound, xs + j * d + bound]
            acc += weight[:, 0, i + 1, j + 1].astype(np.int64).reshape(-1, 1, 1) * tap
    return acc


def shuffle(x: np.ndarray, groups: int) -> np.ndarray:
    c = x.shape[0]
    k = np.arange(c)
    return x[(k % groups) * (c // groups) + k // groups]


def _run_layer(layer: Layer, graph: Graph, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    ins = [env[n] for n in layer.inputs]
    wt = graph.weights
    if layer.kind in ("conv", "deform_dw"):
        weight, bias = wt[f"{layer.name}.weight"], wt[f"{layer.name}.bias"]
        if layer.kind == "conv":
            acc = conv(ins[0], weight, bias, layer.stride, layer.groups)
        else:
            acc = deform_dw(ins[0], ins[1], weight, bias, layer.bound)
        if not layer.requant:
            return [acc]
        lo, hi = layer.clamp if layer.clamp else graph.tensor(layer.outputs[0]).range
        return [requantize(acc, wt[f"{layer.name}.multiplier"], wt[f"{layer.name}.shift"], lo, hi)]
    if layer.kind == "upsample":
        return [ins[0].repeat(2, axis=1).repeat(2, axis=2)]
    if layer.kind == "concat":
        return [np.concatenate(ins, axis=0)]
    if layer.kind == "split":
        half = ins[0].shape[0] // 2
        return [ins[0][:half], ins[0][half:]]
    if layer.kind == "shuffle":
        return [shuffle(ins[0], layer.groups)]
    raise UserError(f"IR layer {layer.name} has kind {layer.kind!r}, which the reference cannot run")


def run_graph(graph: Graph, image: np.ndarray) -> dict[str, np.ndarray]:
    """Every tensor of the graph (int64) for one uint8 CHW image."""
    expected = graph.tensor(graph.input).shape
    if tuple(image.shape) != tuple(expected):
        raise UserError(f"image shape {tuple(image.shape)} does not match the graph input {tuple(expected)} (CHW)")
    env: dict[str, np.ndarray] = {graph.input: image.astype(np.int64)}
    for layer in graph.layers:
        outs = _run_layer(layer, graph, env)
        for name, value in zip(layer.outputs, outs):
            shape = graph.tensor(name).shape
            if tuple(value.shape) != tuple(shape):
                raise UserError(f"IR layer {layer.name} produced {name} of shape {value.shape}, but the graph says {shape}")
            env[name] = value
    return env


def run_outputs(graph: Graph, image: np.ndarray) -> list[np.ndarray]:
    env = run_graph(graph, image)
    return [env[n] for n in graph.outputs]
