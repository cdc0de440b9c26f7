"""ctypes bindings of the ConvFirst block kernels (kernels.c) and ``FusedConvFirstBlock``, one block's weights packed for them.

The library is compiled at first use by the BlockFFN build machinery (same
flags, cache and atomic build, another source) and loaded once per process.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

SOURCE = Path(__file__).with_name("kernels.c")
LIB_NAME = "libedgekit_convfirst.so"
ACTIVATIONS = {nn.ReLU: 0, nn.GELU: 1}

_lock = threading.Lock()
_loaded: dict[str, Any] = {}


def _library() -> ctypes.CDLL:
    with _lock:
        if "lib" not in _loaded:
            from edgekit.runtimes.blockffn.build import library_path

            path = library_path(source=SOURCE, lib_name=LIB_NAME)
            lib = ctypes.CDLL(str(path))
            i, p = ctypes.c_int, ctypes.c_void_p
            lib.cf_block.argtypes = [i] * 8 + [p] * 7 + [i, i, i, p]
            lib.cf_block.restype = i
            lib.cf_max_threads.restype = i
            lib.cf_register_tile.restype = i
            lib.cf_panel_width.restype = i
            _loaded["lib"], _loaded["path"] = lib, path
        return _loaded["lib"]


def _np(t: torch.Tensor | None, n: int) -> np.ndarray:
    if t is None:
        return np.zeros(n, np.float32)
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)


def _conv_geometry(conv: nn.Module, name: str, kernel: int | None) -> None:
    """ValueError naming the first setting of ``conv`` the fused kernel does not implement."""
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"{name} must be an nn.Conv2d, got {type(conv).__name__}")
    k = conv.kernel_size
    if conv.stride != (1, 1):
        raise ValueError(f"{name} has stride {conv.stride}: the fused ConvFirst kernel implements stride 1 only")
    if conv.dilation != (1, 1):
        raise ValueError(f"{name} has dilation {conv.dilation}: the fused ConvFirst kernel implements dilation 1 only")
    if conv.padding_mode != "zeros":
        raise ValueError(f"{name} has padding_mode {conv.padding_mode!r}: the fused ConvFirst kernel implements 'zeros' only")
    if kernel is None:  # the k x k conv: square, odd, 'same' padding
        if k[0] != k[1] or k[0] % 2 == 0 or conv.padding != (k[0] // 2, k[0] // 2):
            raise ValueError(f"{name} has kernel {k} and padding {conv.padding}: the fused ConvFirst kernel needs a square "
                             "odd kernel k with padding k // 2")
    elif k != (kernel, kernel) or conv.groups != 1:
        raise ValueError(f"{name} must be a 1x1 conv without groups, got kernel {k} and groups {conv.groups}")


def _panels(w: np.ndarray, width: int) -> np.ndarray:
    """(K, N) -> the N // width column panels of K x width floats, each contiguous, then the K x (N % width) rest."""
    K, N = w.shape
    full = N // width * width
    main = w[:, :full].reshape(K, N // width, width).transpose(1, 0, 2).ravel()
    return np.ascontiguousarray(np.concatenate([main, w[:, full:].ravel()]), dtype=np.float32)


def _check_threads(threads: int | None) -> int | None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None (OpenMP's maximum), got {threads!r}")
    return threads


class FusedConvFirstBlock:
    """One deploy-form ConvFirst block for the C kernels: ``y = block(x)``, fused (default) or layer by layer.

    ``__call__`` takes NCHW (like the torch block: numpy or torch, returns the same
    kind) and converts to the kernels' NHWC at the boundary; ``nhwc(x)`` takes and
    returns NHWC float32 numpy arrays without conversion (chain blocks this way).
    ``tile``: output pixels per fused tile (default sized so the tile's intermediates,
    tile x (C + E) floats, take about 64 KiB). ``threads`` None = OpenMP's maximum.
    """

    def __init__(self, conv_w, conv_b, expand_w, expand_b, project_w, project_b, *, groups: int, activation: str = "relu",
                 stride: int = 1, tile: int | None = None, threads: int | None = None) -> None:
        if stride != 1:
            raise ValueError(f"stride {stride}: the fused ConvFirst kernel implements stride 1 only")
        if activation not in ("relu", "gelu"):
            raise ValueError(f"activation {activation!r}: the ConvFirst kernels implement 'relu' and 'gelu' only")
        wc = np.asarray(conv_w, np.float32)
        C, gw, k = (wc.shape + (0, 0, 0))[:3]
        if wc.ndim != 4 or wc.shape[3] != k or C != gw * groups:
            raise ValueError(f"conv weight must be (C, C / groups, k, k) with groups={groups}, got {wc.shape}")
        w1, w2 = np.asarray(expand_w, np.float32), np.asarray(project_w, np.float32)
        E = w1.shape[0]
        if w1.reshape(E, -1).shape[1] != C or w2.reshape(C, -1).shape[1] != E or w2.shape[0] != C:
            raise ValueError(f"expand must be ({E}, {C}) and project ({C}, {E}), got {w1.shape} and {w2.shape}")
        self.channels, self.hidden, self.kernel, self.group_width = int(C), int(E), int(k), int(gw)
        self.activation = activation
        self.threads = _check_threads(threads)
        mr, nr = _library().cf_register_tile(), _library().cf_panel_width()
        self.tile = int(tile) if tile is not None else max(mr, (65536 // (4 * (C + E))) // mr * mr)
        if self.tile < 1:
            raise ValueError(f"tile must be a positive number of pixels, got {tile}")
        # (C, gw_in, k, k) -> [group][ky][kx][gw_in][gw_out]: a group's weights contiguous, outputs innermost
        self.wc = np.ascontiguousarray(wc.reshape(groups, gw, gw, k, k).transpose(0, 3, 4, 2, 1))
        self.bc = np.ascontiguousarray(conv_b, np.float32)
        self.w1 = _panels(w1.reshape(E, C).T, nr)  # (C, E): a row per input channel, in column panels
        self.b1 = np.ascontiguousarray(expand_b, np.float32)
        self.w2 = _panels(w2.reshape(C, E).T, nr)  # (E, C)
        self.b2 = np.ascontiguousarray(project_b, np.float32)
        if self.bc.shape != (C,) or self.b1.shape != (E,) or self.b2.shape != (C,):
            raise ValueError(f"biases must be ({C},), ({E},), ({C},), got {self.bc.shape}, {self.b1.shape}, {self.b2.shape}")

    @classmethod
    def from_block(cls, block: nn.Module, *, tile: int | None = None, threads: int | None = None) -> FusedConvFirstBlock:
        """Pack a deploy-form ``models.convfirst.ConvFirstBlock`` (after ``reparameterize()`` or ``deploy``)."""
        for name in ("norm", "scale"):
            if not isinstance(getattr(block, name, None), nn.Identity):
                raise ValueError(f"block.{name} is {type(getattr(block, name, None)).__name__}, not folded: the kernels take the "
                                 "deploy form; call block.reparameterize() or edgekit.models.reparam.deploy(model) first")
        _conv_geometry(block.conv, "block.conv", None)
        _conv_geometry(block.expand, "block.expand", 1)
        _conv_geometry(block.project, "block.project", 1)
        act = {0: "relu", 1: "gelu"}.get(ACTIVATIONS.get(type(block.act), -1))
        if act is None or (isinstance(block.act, nn.GELU) and block.act.approximate != "none"):
            raise ValueError(f"block.act is {block.act}: the ConvFirst kernels implement ReLU and exact GELU only")
        C, E = block.conv.out_channels, block.expand.out_channels
        return cls(_np(block.conv.weight, 0), _np(block.conv.bias, C), _np(block.expand.weight, 0), _np(block.expand.bias, E),
                   _np(block.project.weight, 0), _np(block.project.bias, C), groups=block.conv.groups, activation=act,
                   tile=tile, threads=threads)

    def intermediate_bytes(self, batch: int, height: int, width: int) -> int:
        """Bytes the unfused path writes between layers (the grouped conv's and the expansion's outputs)."""
        return 4 * batch * height * width * (self.channels + self.hidden)

    def nhwc(self, x: np.ndarray, *, fused: bool = True, threads: int | None = None) -> np.ndarray:
        """y (N, H, W, C) float32 from x (N, H, W, C)."""
        a = np.asarray(x)
        if a.ndim != 4 or a.shape[3] != self.channels:
            raise ValueError(f"x must be NHWC (N, H, W, {self.channels}), got shape {a.shape}")
        a = np.ascontiguousarray(a, dtype=np.float32)
        y = np.empty_like(a)
        N, H, W, C = a.shape
        t = self.threads if threads is None else _check_threads(threads)
        rc = _library().cf_block(int(fused), N, H, W, C, self.hidden, self.kernel, self.group_width, a.ctypes.data,
                                 self.wc.ctypes.data, self.bc.ctypes.data, self.w1.ctypes.data, self.b1.ctypes.data,
                                 self.w2.ctypes.data, self.b2.ctypes.data, int(self.activation == "gelu"), self.tile,
                                 0 if t is None else int(t), y.ctypes.data)
        if rc != 0:
            raise MemoryError(f"the ConvFirst kernel could not allocate its buffers for input {a.shape}")
        return y

    def __call__(self, x: np.ndarray | torch.Tensor, *, fused: bool = True, threads: int | None = None) -> np.ndarray | torch.Tensor:
        """y (N, C, H, W) from x (N, C, H, W); a torch tensor in gives a torch tensor out."""
        is_torch = isinstance(x, torch.Tensor)
        a = x.detach().cpu().numpy() if is_torch else np.asarray(x)
        if a.ndim != 4:
            raise ValueError(f"x must be NCHW (N, {self.channels}, H, W), got shape {a.shape}")
        y = self.nhwc(a.transpose(0, 2, 3, 1), fused=fused, threads=threads).transpose(0, 3, 1, 2)
        y = np.ascontiguousarray(y)
        return torch.from_numpy(y) if is_torch else y

    def __repr__(self) -> str:
        return (f"FusedConvFirstBlock(C={self.channels}, E={self.hidden}, k={self.kernel}, group_width={self.group_width}, "
                f"activation={self.activation!r}, tile={self.tile})")


def run_fused(model: nn.Module, image: torch.Tensor, *, fused: bool = True, threads: int | None = None) -> torch.Tensor:
    """Logits of a deployed ``ConvFirst`` model with every block in the C kernels, the rest in torch.

    Each stage's blocks run back to back in NHWC (one layout conversion per stage).
    """
    blocks = {id(s): [FusedConvFirstBlock.from_block(b, threads=threads) for b in s.blocks] for s in model.stages}
    with torch.no_grad():
        x = model.stem(image)
        for stage in model.stages:
            x = stage.down(x)
            h = np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1))
            for fb in blocks[id(stage)]:
                h = fb.nhwc(h, fused=fused)
            x = torch.from_numpy(np.ascontiguousarray(h.transpose(0, 3, 1, 2)))
        return model.head(x)


def kernel_info() -> dict[str, Any]:
    """Library path and OpenMP threads of the ConvFirst kernels (builds them if needed)."""
    lib = _library()
    return {"library": str(_loaded["path"]), "openmp_max_threads": lib.cf_max_threads(), "register_tile": lib.cf_register_tile()}
