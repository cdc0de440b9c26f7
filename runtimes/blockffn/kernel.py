"""ctypes bindings of the BlockFFN C kernels and ``SparseFFN``, one layer's weights packed for them.

``SparseFFN`` holds the weights as contiguous float32 (or per-row int8 plus a
float scale per row) arrays and calls the kernels without copying inputs that
are already float32 and C-contiguous. The native library is compiled on first
use (``build.py``) and loaded once per process.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import numpy as np

from edgekit.errors import UserError

ACTIVATIONS = {"relu": 0, "silu": 1, "gelu": 2}
DTYPES = {"fp32": 0, "int8": 1}

_lock = threading.Lock()
_loaded: dict[str, Any] = {}


def _library() -> ctypes.CDLL:
    with _lock:
        if "lib" not in _loaded:
            from edgekit.runtimes.blockffn.build import library_path

            path = library_path()
            lib = ctypes.CDLL(str(path))
            i, p, f = ctypes.c_int, ctypes.c_void_p, ctypes.c_float
            lib.ek_experts.argtypes = [i, i, i, i, p, p, p, p, p, p, p, p, i, i, i, p]
            lib.ek_experts.restype = i
            lib.ek_route.argtypes = [i, i, i, p, p, p, p, f, i, p]
            lib.ek_route.restype = i
            lib.ek_max_threads.restype = i
            lib.ek_openmp.restype = i
            lib.ek_simd.restype = ctypes.c_char_p
            _loaded["lib"], _loaded["path"] = lib, path
        return _loaded["lib"]


def kernel_info() -> dict[str, Any]:
    """Compiler, flags, SIMD level and library path of the native kernels (builds them if needed)."""
    from edgekit.runtimes.blockffn import build

    lib = _library()
    return {
        "compiler": build.find_compiler(),
        "version": build.compiler_version(),
        "flags": build.BASE_FLAGS + build.NATIVE_FLAGS,
        "simd": lib.ek_simd().decode(),
        "library": str(_loaded["path"]),
        "openmp": lib.ek_openmp(),
        "openmp_max_threads": lib.ek_max_threads(),
    }


def _numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor (possibly a Parameter)
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _packed(name: str, a: Any, shape: tuple[int, ...]) -> np.ndarray:
    a = _numpy(a)
    if a.dtype.kind not in "fiu":
        raise UserError(f"{name} must be a float array, got dtype {a.dtype}")
    if a.shape != shape:
        raise UserError(f"{name} must have shape {shape}, got {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float32)


def quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row of the last axis: w ~= q * scale[..., None], q in [-127, 127]."""
    amax = np.abs(w).max(axis=-1)
    scale = (amax / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / safe[..., None]), -127, 127).astype(np.int8)
    return np.ascontiguousarray(q), np.ascontiguousarray(scale)


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


class SparseFFN:
    """One BlockFFN layer for the C kernels: ``route(x)``, ``experts(x, scores)``, ``ffn(x)``.

    up, down: (E, B, d); up_bias: (E, B); out_bias: (d,); router_w: (E, d);
    router_b, norm_w: (E,). ``dtype="int8"`` stores each neuron's up and down
    rows as symmetric int8 with one float scale per row; activations stay float.
    ``threads`` (None = OpenMP's maximum) can be overridden per call.
    """

    def __init__(self, up, down, *, up_bias=None, out_bias=None, router_w=None, router_b=None, norm_w=None,
                 eps: float = 1e-6, activation: str = "silu", dtype: str = "fp32", threads: int | None = None) -> None:
        if activation not in ACTIVATIONS:
            raise UserError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if dtype not in DTYPES:
            raise UserError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        up_np = _numpy(up)
        if up_np.ndim != 3:
            raise UserError(f"up must have shape (experts, expert_size, dim), got {up_np.shape}")
        E, B, d = (int(n) for n in up_np.shape)
        if min(E, B, d) < 1:
            raise UserError(f"up must have at least one expert, neuron and input feature, got shape {up_np.shape}")
        self.num_experts, self.expert_size, self.dim = E, B, d
        self.activation, self.dtype, self.eps = activation, dtype, float(eps)
        self.threads = self._check_threads(threads)
        up32, down32 = _packed("up", up_np, (E, B, d)), _packed("down", down, (E, B, d))
        self.up_bias = None if up_bias is None else _packed("up_bias", up_bias, (E, B))
        self.out_bias = None if out_bias is None else _packed("out_bias", out_bias, (d,))
        if dtype == "int8":
            self.up, self.up_scale = quantize_rows(up32)
            self.down, self.down_scale = quantize_rows(down32)
        else:
            self.up, self.down = up32, down32
            self.up_scale = self.down_scale = None
        self.router_w = None if router_w is None else _packed("router_w", router_w, (E, d))
        self.router_b = None if router_b is None else _packed("router_b", router_b, (E,))
        self.norm_w = None if norm_w is None else _packed("norm_w", norm_w, (E,))
        if self.router_w is None and (self.router_b is not None or self.norm_w is not None):
            raise UserError("router_b and norm_w need router_w; pass router_w (experts, dim) too")
        self._lib = _library()
        # argument tuples built once: a call only adds x, scores, y and the thread count
        self._weights = (_ptr(self.up), _ptr(self.up_scale), _ptr(self.up_bias), _ptr(self.down),
                         _ptr(self.down_scale), _ptr(self.out_bias), DTYPES[dtype], ACTIVATIONS[activation])
        self._router = (_ptr(self.router_w), _ptr(self.router_b), _ptr(self.norm_w), ctypes.c_float(self.eps))

    @classmethod
    def from_module(cls, m, *, dtype: str = "fp32", threads: int | None = None) -> SparseFFN:
        """Pack a ``models.blockffn.BlockFFN`` (router, router_norm, up, up_bias, down, out_bias, activation)."""
        norm = m.router_norm
        return cls(m.up, m.down, up_bias=m.up_bias, out_bias=m.out_bias, router_w=m.router.weight,
                   router_b=m.router.bias, norm_w=norm.weight, eps=float(getattr(norm, "eps", 1e-6)),
                   activation=m.activation, dtype=dtype, threads=threads)

    @property
    def expert_bytes(self) -> int:
        """Bytes of this layer's expert weights as stored (up and down, plus the int8 row scales)."""
        return sum(a.nbytes for a in (self.up, self.down, self.up_scale, self.down_scale) if a is not None)

    def dequantized(self) -> tuple[np.ndarray, np.ndarray]:
        """(up, down) as float32, exactly the values the kernels multiply with."""
        if self.dtype == "fp32":
            return self.up, self.down
        return (self.up.astype(np.float32) * self.up_scale[..., None],
                self.down.astype(np.float32) * self.down_scale[..., None])

    # -- calls -------------------------------------------------------------------------------
    def route(self, x, *, threads: int | None = None) -> np.ndarray:
        """Router scores (L, E) float32 (or (E,) for one token given as (d,))."""
        if self.router_w is None:
            raise UserError("this SparseFFN has no router; build it with router_w (and router_b, norm_w) or use experts(x, scores)")
        xs, single = self._tokens(x)
        L = xs.shape[0]
        scores = np.empty((L, self.num_experts), np.float32)
        self._lib.ek_route(L, self.dim, self.num_experts, xs.ctypes.data, *self._router,
                           self._threads(threads), scores.ctypes.data)
        return scores[0] if single else scores

    def experts(self, x, scores, *, threads: int | None = None) -> np.ndarray:
        """y (L, d) float32 (or (d,)): reads only the experts active (score != 0) for some token of x."""
        xs, single = self._tokens(x)
        L = xs.shape[0]
        s = _numpy(scores)
        if s.dtype.kind != "f":
            raise UserError(f"scores must be a float array, got dtype {s.dtype}")
        if s.shape != (L, self.num_experts) and not (single and s.shape == (self.num_experts,)):
            raise UserError(f"scores must have shape {(L, self.num_experts)} (tokens, experts) for x of shape "
                            f"{np.shape(x)}, got {s.shape}")
        s = np.ascontiguousarray(s, dtype=np.float32)
        y = np.empty((L, self.dim), np.float32)
        rc = self._lib.ek_experts(L, self.dim, self.num_experts, self.expert_size, xs.ctypes.data, s.ctypes.data,
                                  *self._weights, self._threads(threads), y.ctypes.data)
        if rc != 0:
            raise MemoryError(f"the BlockFFN kernel could not allocate its work space for {L} tokens")
        return y[0] if single else y

    def __call__(self, x, *, threads: int | None = None) -> np.ndarray:
        return self.experts(x, self.route(x, threads=threads), threads=threads)

    # -- checks ------------------------------------------------------------------------------
    def _tokens(self, x) -> tuple[np.ndarray, bool]:
        a = _numpy(x)
        if a.dtype.kind != "f":
            raise UserError(f"x must be a float array (float32), got dtype {a.dtype}")
        if a.ndim not in (1, 2):
            raise UserError(f"x must be (tokens, {self.dim}) or ({self.dim},), got shape {a.shape}; "
                            "flatten batch and sequence into tokens first")
        if a.shape[-1] != self.dim:
            raise UserError(f"x has {a.shape[-1]} features in its last axis; this FFN's dim is {self.dim}")
        single = a.ndim == 1
        if single:
            a = a[None, :]
        if a.dtype != np.float32 or not a.flags.c_contiguous:
            a = np.ascontiguousarray(a, dtype=np.float32)
        return a, single

    @staticmethod
    def _check_threads(threads) -> int | None:
        if threads is None:
            return None
        if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
            raise UserError(f"threads must be a positive integer or None, got {threads!r}")
        return int(threads)

    def _threads(self, threads) -> int:
        t = self.threads if threads is None else self._check_threads(threads)
        return 0 if t is None else t

    def __repr__(self) -> str:
        return (f"SparseFFN(dim={self.dim}, experts={self.num_experts}x{self.expert_size}, "
                f"activation={self.activation!r}, dtype={self.dtype!r})")
