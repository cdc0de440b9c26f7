"""BlockFFN: edgekit's sparse FFN kernels against dense and naive sparse baselines (issue 7).

One process, fp32 activations, silu, torch and the kernels both on THREADS threads. Per
configuration (the ~0.5B end-side shape d=2048 with 64 blocks of 128, and a small one,
d=512 with 32 blocks of 64), N independent layers of random weights are built, N chosen so
the rotating working set is at least twice the last-level cache even in int8; every timed
call uses the next layer, so no variant runs from cache.

Implementations, on the same weights and inputs:
  dense torch      two F.linear (up as (E*B, d), down laid out (d, E*B)), silu, scores
                   multiplied in: torch's BLAS computing every block;
  dense edgekit    SparseFFN.experts with every block active (all scores > 0);
  naive gather     union of active blocks from the scores, torch index_select of their up
                   and down rows, then the same matmuls (the obvious sparse implementation);
  edgekit fp32 / int8   SparseFFN.experts with the real scores (int8: per-row weights);
  route            SparseFFN.route on the same tokens (the router's share of the FFN);
  empty call       SparseFFN.experts with no active block: argument checks, the union and
                   per-token compaction of the scores, the output bias, no weight read.
                   Its share of the sparse time bounds the compaction overhead from above.

Sparsity patterns. L=1 (decoding): (1-TLS)*E random blocks active, rounded up (a row is
never sparser than its label). Chunks of L=8 and 32 tokens at a chosen chunk-level sparsity
CLS: the union is (1-CLS)*E random blocks, rounded up; each token activates a random TOKEN_SHARE (2/3) of the union, then blocks no token
picked are swapped in, so the union is exactly the one asked for. 2/3 turns CLS 70% into
TLS 80%, the paper's pair. Scores of active blocks are uniform in [0.5, 1.5]. A pool of
random patterns per layer rotates with the layers (the same few experts per layer would
stay in cache at high sparsity). The TLS and CLS columns are measured on the patterns.

Timing: outputs of every variant are checked against the float64 reference first (a wrong
kernel stops the run before any table). Then ROUNDS rounds; in each, every variant runs one
block (two warm-up calls, then calls for at least BLOCK_SECONDS and a full rotation of the
layers; block median), in alternating order, with a pause between blocks. Ratios are taken
within a round and the median over rounds is reported: absolute times on this shared
2-vCPU machine are noisy, ratios much less so. A block during which other processes used
more than 10% of the CPUs (from /proc/stat) is repeated once they pause; the counts of
repeated and still-contended blocks are in the results.

Run: python bench/blockffn.py  (under 10 min on 2 cores; writes bench/results/blockffn.md
and blockffn.json). --quick: smaller shapes, few layers and repeats, output to a temporary
folder (for development; its numbers say nothing about the cache-exceeding case).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edgekit import fsio
from edgekit.machine import cpu_ticks, machine_info, versions
from edgekit.runtimes.blockffn import SparseFFN, kernel_info, reference_experts, reference_router

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blockffn_e2e  # noqa: E402  (bench/ is not a package)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
THREADS = 2
SEED = 0
ACTIVATION = "silu"
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)  # TLS for L=1, CLS for chunks
CHUNKS = (1, 8, 32)
TOKEN_SHARE = 2 / 3  # share of the chunk's union one token activates: CLS 70% -> TLS 80%
TARGETS = {(1, 0.8): 4.0, (8, 0.7): 3.0}  # (L, sparsity) -> speedup over the better dense baseline, first config
MIN_LAYERS = 8
MAX_PATTERNS_PER_LAYER = 64
FP32_TOL = 1e-4  # max |y - ref| / max |ref|; fp32 sums of up to 8192 terms stay near 1e-6
PAUSE = 0.05  # idle OpenMP workers of the previous block spin for a while
CONTENTION = 0.10  # a block during which other processes used more than this share of the CPUs is repeated
RETRIES = 4
QUIET_WAIT = 30.0  # seconds to wait for the other jobs to pause before repeating a block
WAIT_BUDGET = 300.0  # at most this much waiting in a run; then contended blocks are kept (and counted)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CPUS = os.cpu_count() or 1


@dataclass
class Config:
    name: str
    d: int
    E: int
    B: int


FULL = [Config("0.5B end-side (d=2048, 64 blocks of 128)", 2048, 64, 128), Config("small (d=512, 32 blocks of 64)", 512, 32, 64)]
QUICK = [Config("quick 0.5B-like (d=1024, 32 blocks of 64)", 1024, 32, 64), Config("quick small (d=256, 16 blocks of 32)", 256, 16, 32)]


@dataclass
class Settings:
    quick: bool
    rounds: int
    block_seconds: float
    layers: int | None  # None: enough to exceed the LLC


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- machine -----------------------------------------------------------------------------

def last_level_cache() -> dict[str, Any]:
    """Size of the largest-level data/unified cache, from /sys (lscpu as a fallback)."""
    best: tuple[int, int, str] | None = None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = int((index / "level").read_text())
            size = _bytes((index / "size").read_text().strip())
        except (OSError, ValueError):
            continue
        if best is None or level > best[0]:
            best = (level, size, "/sys/devices/system/cpu/cpu0/cache")
    if best is None:
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
            for level in (3, 2):
                m = re.search(rf"^L{level} cache:\s*([\d.]+\s*[KMG]i?B)", out, re.MULTILINE)
                if m:
                    best = (level, _bytes(m.group(1)), "lscpu")
                    break
        except (OSError, subprocess.CalledProcessError):
            pass
    if best is None:
        return {"level": None, "bytes": None, "source": None}
    return {"level": best[0], "bytes": best[1], "source": best[2]}


def _bytes(text: str) -> int:
    m = re.fullmatch(r"([\d.]+)\s*([KMG]?)(i?B)?", text.strip())
    if not m:
        raise ValueError(text)
    return int(float(m.group(1)) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[m.group(2)])


# -- weights and patterns ----------------------------------------------------------------

@dataclass
class Layer:
    arrays: dict[str, np.ndarray]  # the numpy weights (SparseFFN fp32 and the torch views share them)
    up_flat: torch.Tensor  # (E*B, d), torch's layout for F.linear
    down_lin: torch.Tensor  # (d, E*B), torch's layout for F.linear
    up3: torch.Tensor  # (E, B, d), for the gather
    down3: torch.Tensor
    up_bias: torch.Tensor  # (E, B)
    out_bias: torch.Tensor
    fp32: SparseFFN
    int8: SparseFFN


def make_layers(cfg: Config, n: int, rng: np.random.Generator) -> list[Layer]:
    E, B, d = cfg.E, cfg.B, cfg.d
    layers = []
    for _ in range(n):
        w = {
            "up": _normal(rng, (E, B, d), d**-0.5),
            "down": _normal(rng, (E, B, d), (E * B) ** -0.5),
            "up_bias": _normal(rng, (E, B), 0.1),
            "out_bias": _normal(rng, (d,), 0.1),
            "router_w": _normal(rng, (E, d), d**-0.5),
            "router_b": _normal(rng, (E,), 0.1),
            "norm_w": rng.uniform(0.5, 1.5, E).astype(np.float32),
        }
        kw = {k: w[k] for k in ("up_bias", "out_bias", "router_w", "router_b", "norm_w")}
        up3, down3 = torch.from_numpy(w["up"]), torch.from_numpy(w["down"])
        layers.append(Layer(
            arrays=w,
            up_flat=up3.view(E * B, d),
            down_lin=down3.view(E * B, d).t().contiguous(),
            up3=up3,
            down3=down3,
            up_bias=torch.from_numpy(w["up_bias"]),
            out_bias=torch.from_numpy(w["out_bias"]),
            fp32=SparseFFN(w["up"], w["down"], dtype="fp32", activation=ACTIVATION, threads=THREADS, **kw),
            int8=SparseFFN(w["up"], w["down"], dtype="int8", activation=ACTIVATION, threads=THREADS, **kw),
        ))
    return layers


def _normal(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    a = rng.standard_normal(shape, dtype=np.float32)
    a *= np.float32(scale)
    return a


def active_blocks(E: int, sparsity: float) -> int:
    """Blocks active at ``sparsity``, rounded up: a row is never sparser than its label."""
    return max(1, math.ceil((1 - sparsity) * E - 1e-9))


def chunk_pattern(rng: np.random.Generator, L: int, E: int, sparsity: float) -> np.ndarray:
    """Scores (L, E): for L=1 ``sparsity`` is the TLS, for a chunk it is the CLS (see the module docstring)."""
    u = active_blocks(E, sparsity)
    k = u if L == 1 else max(1, round(u * TOKEN_SHARE))
    union = rng.choice(E, u, replace=False)
    active = np.zeros((L, u), dtype=bool)
    np.put_along_axis(active, np.argsort(rng.random((L, u)), axis=1)[:, :k], True, axis=1)
    for j in np.flatnonzero(~active.any(0)):  # a block nobody picked: move one duplicate pick onto it
        t, j2 = _pick(rng, np.argwhere(active & (active.sum(0) >= 2)))
        active[t, j2], active[t, j] = False, True
    scores = np.zeros((L, E), dtype=np.float32)
    scores[:, union] = active * rng.uniform(0.5, 1.5, (L, u)).astype(np.float32)
    return scores


def _pick(rng: np.random.Generator, rows: np.ndarray) -> np.ndarray:
    return rows[rng.integers(len(rows))]


@dataclass
class Pool:
    """Patterns for one row; pattern j belongs to layer j % n_layers."""

    scores: list[np.ndarray]
    scores_t: list[torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.scores_t = [torch.from_numpy(s) for s in self.scores]

    def measured(self) -> dict[str, float]:
        act = np.stack(self.scores) > 0  # (M, L, E)
        union = act.any(1)  # (M, E)
        return {
            "tls": float(1 - act.mean()),
            "cls": float(1 - union.mean()),
            "union": float(union.sum(1).mean()),
            "per_token": float(act.sum(2).mean()),
        }


def make_pool(rng: np.random.Generator, cfg: Config, L: int, sparsity: float, n_layers: int, llc: int, int8_expert: float) -> Pool:
    u = active_blocks(cfg.E, sparsity)
    # enough distinct patterns that the weights one rotation touches exceed 2x the LLC even in int8
    per_layer = min(MAX_PATTERNS_PER_LAYER, max(2, math.ceil(2 * llc / (n_layers * u * int8_expert))))
    return Pool([chunk_pattern(rng, L, cfg.E, sparsity) for _ in range(n_layers * per_layer)])


# -- the implementations -----------------------------------------------------------------

def dense_torch(x: torch.Tensor, scores: torch.Tensor, ly: Layer) -> torch.Tensor:
    L, E = scores.shape
    h = F.silu(F.linear(x, ly.up_flat, ly.up_bias.view(-1)))
    h = h.view(L, E, -1).mul_(scores.unsqueeze(-1))
    return F.linear(h.view(L, -1), ly.down_lin, ly.out_bias)


def naive_gather(x: torch.Tensor, scores: torch.Tensor, ly: Layer) -> torch.Tensor:
    idx = (scores > 0).any(0).nonzero().squeeze(1)
    u, (_, B, d) = idx.numel(), ly.up3.shape
    up = ly.up3.index_select(0, idx).view(u * B, d)
    h = F.silu(F.linear(x, up, ly.up_bias.index_select(0, idx).view(-1)))
    h = h.view(len(x), u, B).mul_(scores.index_select(1, idx).unsqueeze(-1))
    return torch.addmm(ly.out_bias, h.view(len(x), u * B), ly.down3.index_select(0, idx).view(u * B, d))


def implementations(layers: list[Layer], pool: Pool, x: np.ndarray, dense_scores: np.ndarray) -> dict[str, Callable[[int], Any]]:
    """Each takes the call number j: pattern j % M of the pool, layer j % N."""
    n, m = len(layers), len(pool.scores)
    xt = torch.from_numpy(x)
    empty = np.zeros_like(dense_scores)
    s, st = pool.scores, pool.scores_t
    return {
        "dense_torch": lambda j: dense_torch(xt, st[j % m], layers[j % n]),
        "dense_edgekit": lambda j: layers[j % n].fp32.experts(x, dense_scores),
        "naive_gather": lambda j: naive_gather(xt, st[j % m], layers[j % n]),
        "edgekit_fp32": lambda j: layers[j % n].fp32.experts(x, s[j % m]),
        "edgekit_int8": lambda j: layers[j % n].int8.experts(x, s[j % m]),
        "route": lambda j: layers[j % n].fp32.route(x),
        "empty_call": lambda j: layers[j % n].fp32.experts(x, empty),
    }


# -- correctness -------------------------------------------------------------------------

def rel_err(y: Any, ref: Any) -> float:
    y, ref = _np(y), _np(ref)
    return float(np.abs(y - ref).max() / max(float(np.abs(ref).max()), 1e-30))


def _np(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def check_row(impl: dict[str, Callable[[int], Any]], layers: list[Layer], pool: Pool, x: np.ndarray) -> dict[str, float]:
    """Worst relative error of each sparse variant on the first two patterns (two layers)."""
    errs: dict[str, float] = {}
    for j in range(2):
        w = layers[j % len(layers)].arrays
        ref = reference_experts(x, pool.scores[j], w["up"], w["down"], w["up_bias"], w["out_bias"], ACTIVATION)
        # int8 against the same math on the weights it really multiplies with (activations stay float)
        up8, down8 = layers[j % len(layers)].int8.dequantized()
        ref8 = reference_experts(x, pool.scores[j], up8, down8, w["up_bias"], w["out_bias"], ACTIVATION)
        for name, want in (("dense_torch", ref), ("naive_gather", ref), ("edgekit_fp32", ref), ("edgekit_int8", ref8)):
            e = rel_err(impl[name](j), want)
            errs[name] = max(errs.get(name, 0.0), e)
            if not e <= FP32_TOL:  # also catches NaN
                raise SystemExit(f"{name} differs from the reference: relative error {e:.2e} > {FP32_TOL:.0e} (layer {j}); no table written")
    return errs


def check_fixed(impl: dict[str, Callable[[int], Any]], layers: list[Layer], x: np.ndarray, dense_scores: np.ndarray) -> dict[str, float]:
    """The dense-edgekit, route and empty-call variants against their references (per chunk size)."""
    w = layers[0].arrays
    errs = {
        "dense_edgekit": rel_err(impl["dense_edgekit"](0), reference_experts(x, dense_scores, w["up"], w["down"], w["up_bias"], w["out_bias"], ACTIVATION)),
        "route": rel_err(impl["route"](0), reference_router(x, w["router_w"], w["router_b"], w["norm_w"], 1e-6)),
        "empty_call": rel_err(impl["empty_call"](0), np.broadcast_to(w["out_bias"], x.shape)),
    }
    for name, e in errs.items():
        if not e <= FP32_TOL:
            raise SystemExit(f"{name} differs from the reference: relative error {e:.2e} > {FP32_TOL:.0e}; no table written")
    return errs


# -- timing ------------------------------------------------------------------------------

def _jiffies() -> tuple[int, int]:
    """(busy CPU time of the whole machine, CPU time of this process), in clock ticks."""
    busy, _total, own = cpu_ticks()
    return busy, own


def time_block(fn: Callable[[int], Any], start: int, min_calls: int, seconds: float) -> tuple[float, int, float]:
    """Median seconds per call over one block, the next call number, and the share of the CPUs
    other processes used meanwhile (the machine is shared: a block they slowed is repeated)."""
    fn(start)
    fn(start + 1)  # warm-up of code paths and thread pools; the weights rotate and stay cold
    j, times = start + 2, []
    busy0, own0 = _jiffies()
    t0 = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() < t0 + seconds:
        t = time.perf_counter()
        fn(j)
        times.append(time.perf_counter() - t)
        j += 1
    wall = time.perf_counter() - t0
    busy1, own1 = _jiffies()
    others = max(0, (busy1 - busy0) - (own1 - own0)) / (wall * CLOCK_TICKS * CPUS)
    return statistics.median(times), j, others


_waited = [0.0]  # seconds spent waiting for quiet in this run


def wait_quiet(limit: float) -> bool:
    """Wait (up to ``limit`` seconds, within the run's WAIT_BUDGET) for a quarter second in which
    other processes leave the CPUs idle."""
    start = time.perf_counter()
    end = start + min(limit, max(0.0, WAIT_BUDGET - _waited[0]))
    try:
        while time.perf_counter() < end:
            busy0, own0 = _jiffies()
            time.sleep(0.25)
            busy1, own1 = _jiffies()
            if (busy1 - busy0) - (own1 - own0) <= CONTENTION * 0.25 * CLOCK_TICKS * CPUS:
                return True
        return False
    finally:
        _waited[0] += time.perf_counter() - start


def time_row(impl: dict[str, Callable[[int], Any]], n_layers: int, s: Settings) -> tuple[dict[str, list[float]], dict[str, int]]:
    times: dict[str, list[float]] = {k: [] for k in impl}
    calls = dict.fromkeys(impl, 0)
    noise = {"repeated_blocks": 0, "contended_blocks_kept": 0}
    names = list(impl)
    wait_quiet(QUIET_WAIT)
    with torch.inference_mode():
        for r in range(s.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                for attempt in range(RETRIES + 1):
                    t, calls[name], others = time_block(impl[name], calls[name], n_layers, s.block_seconds)
                    time.sleep(PAUSE)
                    if others <= CONTENTION:
                        break
                    if attempt < RETRIES:
                        noise["repeated_blocks"] += 1
                        wait_quiet(QUIET_WAIT)
                    else:
                        noise["contended_blocks_kept"] += 1
                times[name].append(t)
    return times, noise


def ratio(times: dict[str, list[float]], num: Callable[[dict[str, float]], float], den: str) -> float:
    """Median over rounds of num(round's times) / times[den] in the same round."""
    rounds = len(times[den])
    return statistics.median(num({k: v[r] for k, v in times.items()}) / times[den][r] for r in range(rounds))


def _better_dense(t: dict[str, float]) -> float:
    return min(t["dense_torch"], t["dense_edgekit"])


def summarize(times: dict[str, list[float]], pool: Pool, cfg: Config, layers: list[Layer]) -> dict[str, Any]:
    med = {k: statistics.median(v) for k, v in times.items()}
    meas = pool.measured()
    fp32_expert, int8_expert = layers[0].fp32.expert_bytes / cfg.E, layers[0].int8.expert_bytes / cfg.E
    return {
        **{k: round(v, 4) for k, v in meas.items()},
        "ideal": cfg.E / meas["union"],
        "speedup_vs_dense_torch": ratio(times, lambda t: t["dense_torch"], "edgekit_fp32"),
        "speedup_vs_dense_edgekit": ratio(times, lambda t: t["dense_edgekit"], "edgekit_fp32"),
        "speedup_vs_better_dense": ratio(times, _better_dense, "edgekit_fp32"),
        "naive_gather_speedup": ratio(times, _better_dense, "naive_gather"),
        "int8_speedup": ratio(times, _better_dense, "edgekit_int8"),
        "dense_edgekit_vs_torch": ratio(times, lambda t: t["dense_torch"], "dense_edgekit"),
        "bandwidth_fp32_gbs": meas["union"] * fp32_expert / med["edgekit_fp32"] / 1e9,
        "bandwidth_int8_gbs": meas["union"] * int8_expert / med["edgekit_int8"] / 1e9,
        "bandwidth_dense_torch_gbs": cfg.E * fp32_expert / med["dense_torch"] / 1e9,
        "router_share": ratio(times, lambda t: t["route"], "edgekit_fp32"),
        "empty_call_share": ratio(times, lambda t: t["empty_call"], "edgekit_fp32"),
        "median_ms": {k: v * 1e3 for k, v in med.items()},
        "rounds_ms": {k: [t * 1e3 for t in v] for k, v in times.items()},
    }


# -- one configuration -------------------------------------------------------------------

def bench_config(cfg: Config, s: Settings, llc: int) -> dict[str, Any]:
    rng = np.random.default_rng(SEED)
    int8_layer = 2 * cfg.E * cfg.B * cfg.d  # estimate before building: int8 weights without scales
    n = s.layers or max(MIN_LAYERS, math.ceil(2 * llc / int8_layer))
    log(f"== {cfg.name}: building {n} layers")
    layers = make_layers(cfg, n, rng)
    fp32_bytes, int8_bytes = layers[0].fp32.expert_bytes, layers[0].int8.expert_bytes
    out: dict[str, Any] = {
        "name": cfg.name, "d": cfg.d, "E": cfg.E, "B": cfg.B, "layers": n,
        "layer_bytes": {"fp32": fp32_bytes, "int8": int8_bytes},
        "working_set_bytes": {"fp32": n * fp32_bytes, "int8": n * int8_bytes},
        "rows": [], "checks": {},
    }
    for L in CHUNKS:
        x = rng.standard_normal((L, cfg.d), dtype=np.float32)
        dense_scores = rng.uniform(0.5, 1.5, (L, cfg.E)).astype(np.float32)
        for i, sp in enumerate(SPARSITIES):
            pool = make_pool(rng, cfg, L, sp, n, llc, int8_bytes / cfg.E)
            impl = implementations(layers, pool, x, dense_scores)
            with torch.inference_mode():
                if i == 0:
                    out["checks"][f"L={L}"] = check_fixed(impl, layers, x, dense_scores)
                errs = check_row(impl, layers, pool, x)
            times, noise = time_row(impl, n, s)
            row = {"L": L, "sparsity": sp, "patterns": len(pool.scores), "max_rel_err": errs, **noise,
                   **summarize(times, pool, cfg, layers)}
            out["rows"].append(row)
            log(f"  L={L:2d} {'TLS' if L == 1 else 'CLS'} {sp:.0%}: {row['speedup_vs_better_dense']:.2f}x vs better dense "
                f"(torch {row['speedup_vs_dense_torch']:.2f}x, edgekit dense {row['speedup_vs_dense_edgekit']:.2f}x, "
                f"ideal {row['ideal']:.2f}x), int8 {row['int8_speedup']:.2f}x, naive {row['naive_gather_speedup']:.2f}x; "
                f"blocks repeated {noise['repeated_blocks']}, contended kept {noise['contended_blocks_kept']}, "
                f"waited {_waited[0]:.0f} s so far")
    del layers
    return out


def targets(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    first = configs[0]
    found = []
    for (L, sp), want in TARGETS.items():
        row = next(r for r in first["rows"] if r["L"] == L and r["sparsity"] == sp)
        got = row["speedup_vs_better_dense"]
        found.append({"config": first["name"], "L": L, "sparsity": sp, "measure": "TLS" if L == 1 else "CLS",
                      "target": want, "speedup": got, "met": got >= want, "int8_speedup": row["int8_speedup"]})
    return found


# -- report ------------------------------------------------------------------------------

def _mib(b: float) -> str:
    return f"{b / 1024**2:,.0f} MiB"


def write_results(result: dict[str, Any], out_dir: Path) -> None:
    fsio.write_text(out_dir / "blockffn.md", "\n".join(markdown(result)) + "\n")
    fsio.write_json(out_dir / "blockffn.json", result)
    log(f"wrote {out_dir / 'blockffn.md'} and blockffn.json")


def markdown(result: dict[str, Any]) -> list[str]:
    m, v, k, c, s = result["machine"], result["versions"], result["kernel"], result["llc"], result["settings"]
    llc = f"L{c['level']} cache {_mib(c['bytes'])} (from {c['source']})" if c["bytes"] else "last-level cache unknown"
    lines = [
        "# BlockFFN: sparse FFN kernels against dense and naive sparse baselines",
        "",
        (f"Machine: {m.get('cpu')} ({m.get('cores')} cores, {', '.join(m.get('flags', []))}), {llc}; torch "
         f"{v.get('torch')}, numpy {v.get('numpy')}, edgekit {v.get('edgekit')}; kernels built by {k.get('version')} "
         f"({k.get('simd')}, {' '.join(k.get('flags', []))}); {THREADS} threads for torch and the kernels; "
         f"{result['date']}. fp32 activations, {ACTIVATION}, biases on. {s['rounds']} rounds of blocks of at least "
         f"{s['block_seconds']} s, alternating order; ratios within a round, median over rounds. Whole run "
         f"{result['minutes']:.1f} min ({result['waited_for_quiet_seconds']:.0f} s of it waiting for the other jobs on the machine to pause). "
         "Regenerate: `python bench/blockffn.py`."),
        "",
    ]
    if result["quick"]:
        lines += ["**Quick run (development): small shapes, few layers; the weights may sit in cache.**", ""]
    lines += [
        ("Columns: speedups of edgekit's sparse fp32 kernel over dense torch (BLAS, every block), over edgekit's own "
         "kernel with every block active, and over the better of the two; the naive gather (torch index_select of the "
         "union, then matmuls) and edgekit int8 (int8 weights) against the same better dense baseline; *ideal* = E / "
         "active blocks, the speedup of a purely weight-bound kernel (in a chunk each token computes only its own "
         "blocks, so where the dense chunk is compute-bound the sparse one can beat it); bandwidth = bytes of the active blocks' weights "
         "/ median time; router = route() time / sparse experts() time; empty call = experts() with no active block "
         "(checks, union and per-token compaction, output bias) / sparse experts() time, an upper bound of the "
         "compaction overhead. L=1 rows are set by TLS; chunk rows by CLS, each token activating 2/3 of the chunk's "
         "union (so CLS 70% is TLS 80%); active counts are rounded up, and the TLS and CLS shown are measured on the "
         "patterns."),
        "",
    ]
    for i, cfg in enumerate(result["configs"]):
        lines += config_section(cfg, c["bytes"], first=i == 0)
    lines += ["## Targets", ""]
    rows = result["configs"][0]["rows"]
    for t in result["targets"]:
        r = next(r for r in rows if r["L"] == t["L"] and r["sparsity"] == t["sparsity"])
        lines.append(
            f"- {t['config']}, L={t['L']}, {t['measure']} {t['sparsity']:.0%} (measured TLS {r['tls']:.1%}, CLS "
            f"{r['cls']:.1%}): {t['speedup']:.2f}x over the better dense baseline, target {t['target']:g}x: "
            f"**{'met' if t['met'] else 'not met'}** (int8 weights: {t['int8_speedup']:.2f}x)."
        )
    lines += ["", "## End-to-end decoding (small BlockFFN language model)", ""]
    lines.append(blockffn_e2e.markdown(result["end_to_end"]) if result.get("end_to_end") else "Not measured.")
    return lines


def config_section(cfg: dict[str, Any], llc: int | None, first: bool) -> list[str]:
    ws, lb = cfg["working_set_bytes"], cfg["layer_bytes"]
    l1 = [r for r in cfg["rows"] if r["L"] == 1]
    dense_bw = statistics.median(r["bandwidth_dense_torch_gbs"] for r in l1)
    dense_ms = {name: statistics.median(r["median_ms"][name] for r in l1) for name in ("dense_torch", "dense_edgekit")}
    share = f" ({ws['int8'] / llc:.1f}x the LLC in int8)" if llc else ""
    lines = [
        f"## {cfg['name']}",
        "",
        (f"{cfg['layers']} layers rotating, expert weights {_mib(lb['fp32'])} fp32 / {_mib(lb['int8'])} int8 each: "
         f"working set {_mib(ws['fp32'])} fp32, {_mib(ws['int8'])} int8{share}. Dense at L=1: torch "
         f"{dense_ms['dense_torch']:.2f} ms ({dense_bw:.1f} GB/s of weights), edgekit {dense_ms['dense_edgekit']:.2f} ms."),
        "",
        ("| L | TLS | CLS | active / E | ideal | vs dense torch | vs dense edgekit | **vs better dense** | naive gather "
         "| int8 | bandwidth fp32 / int8 GB/s | router | empty call |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in cfg["rows"]:
        best = f"**{r['speedup_vs_better_dense']:.2f}x**"
        target = TARGETS.get((r["L"], r["sparsity"])) if first else None
        if target:
            best += f" (target {target:g}x: {'met' if r['speedup_vs_better_dense'] >= target else 'NOT met'})"
        lines.append(
            f"| {r['L']} | {r['tls']:.1%} | {r['cls']:.1%} | {r['union']:.1f} / {cfg['E']} | {r['ideal']:.2f}x | "
            f"{r['speedup_vs_dense_torch']:.2f}x | {r['speedup_vs_dense_edgekit']:.2f}x | {best} | "
            f"{r['naive_gather_speedup']:.2f}x | {r['int8_speedup']:.2f}x | "
            f"{r['bandwidth_fp32_gbs']:.1f} / {r['bandwidth_int8_gbs']:.1f} | {r['router_share']:.1%} | "
            f"{r['empty_call_share']:.1%} |"
        )
    worst = max([r["max_rel_err"]["edgekit_fp32"] for r in cfg["rows"]] + [e["dense_edgekit"] for e in cfg["checks"].values()])
    worst8 = max(r["max_rel_err"]["edgekit_int8"] for r in cfg["rows"])
    rep, kept = (sum(r[key] for r in cfg["rows"]) for key in ("repeated_blocks", "contended_blocks_kept"))
    return lines + [
        "",
        (f"Checked before timing against the float64 reference, two layers per row: edgekit fp32 max relative error "
         f"{worst:.1e}, int8 {worst8:.1e} (against the reference on its dequantized weights). Blocks repeated because "
         f"other processes used over {CONTENTION:.0%} of the CPUs meanwhile: {rep}; still contended after {RETRIES} "
         f"repeats, kept: {kept}."),
        "",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, few layers and repeats; output to a temp folder")
    ap.add_argument("--out", type=Path, help="output folder (default bench/results, or a temp folder with --quick)")
    ap.add_argument("--only-e2e", action="store_true", help="measure only the end-to-end decoding; keep the kernel tables of the existing results")
    args = ap.parse_args()
    if args.only_e2e:
        out_dir = args.out or RESULTS
        result = json.loads((out_dir / "blockffn.json").read_text())
        result["end_to_end"] = blockffn_e2e.end_to_end()
        write_results(result, out_dir)
        return
    settings = Settings(quick=True, rounds=2, block_seconds=0.1, layers=4) if args.quick else Settings(quick=False, rounds=5, block_seconds=0.2, layers=None)
    out_dir = args.out or (Path(tempfile.gettempdir()) / "blockffn_quick" if args.quick else RESULTS)
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    llc = last_level_cache()
    llc_bytes = llc["bytes"] or 32 * 1024**2  # unknown: assume a large desktop L3
    configs = [bench_config(cfg, settings, llc_bytes) for cfg in (QUICK if args.quick else FULL)]
    result = {
        "date": datetime.now(UTC).date().isoformat(),
        "quick": settings.quick,
        "settings": {"rounds": settings.rounds, "block_seconds": settings.block_seconds, "threads": THREADS,
                     "token_share": TOKEN_SHARE, "seed": SEED, "activation": ACTIVATION, "tolerance": FP32_TOL},
        "llc": llc,
        "machine": machine_info(),
        "versions": versions(),
        "kernel": kernel_info(),
        "configs": configs,
        "targets": targets(configs),
    }
    result["end_to_end"] = None if args.quick else blockffn_e2e.end_to_end()  # the trained small LM (cached after the first run)
    result["minutes"] = (time.perf_counter() - started) / 60
    result["waited_for_quiet_seconds"] = round(_waited[0], 1)
    write_results(result, out_dir)


if __name__ == "__main__":
    main()
