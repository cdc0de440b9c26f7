"""BlockFFN CPU kernels (runtimes/blockffn): equal to the float64 torch reference, threads, int8, build cache, ARM build."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import types

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgekit.errors import StepFailed, UserError
from edgekit.runtimes.blockffn import SparseFFN, build, kernel_info, quantize_rows, reference_experts, reference_router

REQUIRE_TOOLS = bool(os.environ.get("EDGEKIT_REQUIRE_SYSTEM_TOOLS"))
CROSS = "aarch64-linux-gnu-gcc"
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None and not REQUIRE_TOOLS, reason="gcc is not installed")
needs_cross = pytest.mark.skipif(shutil.which(CROSS) is None and not REQUIRE_TOOLS, reason=f"{CROSS} is not installed")
needs_qemu = pytest.mark.skipif(shutil.which("qemu-aarch64") is None and not REQUIRE_TOOLS, reason="qemu-aarch64 is not installed")
pytestmark = needs_gcc
ARM_FLAGS = ["-O3", "-mcpu=cortex-a55", "-fopenmp"]


def layer(seed: int, E: int, B: int, d: int, *, biases: bool = True, router: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    p = {"up": rng.standard_normal((E, B, d), dtype=np.float32) / np.sqrt(d),
         "down": rng.standard_normal((E, B, d), dtype=np.float32) / np.sqrt(B)}
    if biases:
        p["up_bias"] = rng.standard_normal((E, B), dtype=np.float32) * 0.1
        p["out_bias"] = rng.standard_normal(d, dtype=np.float32) * 0.1
    if router:
        p["router_w"] = rng.standard_normal((E, d), dtype=np.float32) / np.sqrt(d)
        p["router_b"] = rng.standard_normal(E, dtype=np.float32) * 0.1
        p["norm_w"] = rng.uniform(0.5, 1.5, E)
    return {k: v.astype(np.float32) for k, v in p.items()}


def sparse_scores(seed: int, L: int, E: int, inactive: float) -> np.ndarray:
    """Positive scores with a share `inactive` of (token, expert) pairs zero; some tokens fully inactive."""
    rng = np.random.default_rng(seed)
    scores = rng.uniform(0.2, 2.0, (L, E)).astype(np.float32)
    scores[rng.random((L, E)) < inactive] = 0.0
    if L > 2:
        scores[1] = 0.0  # a token with zero active experts
    return scores


def rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))


def expected(ffn: SparseFFN, p: dict, x, scores) -> np.ndarray:
    up, down = ffn.dequantized()
    return reference_experts(x, scores, up, down, p.get("up_bias"), p.get("out_bias"), ffn.activation)


def term_scale(ffn: SparseFFN, p: dict, x, scores) -> float:
    """Largest sum of |terms| of an output (|score * h * down| over experts and neurons): fp32 rounding
    error is proportional to it, not to the output, which can cancel to almost nothing."""
    import torch

    up, down = (torch.as_tensor(a, dtype=torch.float64) for a in ffn.dequantized())
    pre = torch.einsum("ebd,td->teb", up, torch.as_tensor(x, dtype=torch.float64))
    if p.get("up_bias") is not None:
        pre = pre + torch.as_tensor(p["up_bias"], dtype=torch.float64)
    act = {"relu": torch.relu, "silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu}[ffn.activation]
    h = act(pre).abs() * torch.as_tensor(np.abs(scores), dtype=torch.float64).unsqueeze(-1)
    return float(torch.einsum("teb,ebd->td", h, down.abs()).max())


@pytest.mark.parametrize("L", [1, 2, 7, 8, 32])
@pytest.mark.parametrize("inactive", [0.0, 0.5, 0.8, 0.95, 1.0])
def test_experts_equal_reference_across_sparsity_and_chunks(L, inactive):
    p = layer(0, E=8, B=16, d=72)
    ffn = SparseFFN(p["up"], p["down"], up_bias=p["up_bias"], out_bias=p["out_bias"])
    x = np.random.default_rng(L).standard_normal((L, 72), dtype=np.float32)
    scores = sparse_scores(L, L, 8, inactive)
    y = ffn.experts(x, scores)
    assert y.shape == (L, 72) and y.dtype == np.float32
    assert rel_err(y, expected(ffn, p, x, scores)) < 1e-5
    idle = ~scores.any(axis=1)
    np.testing.assert_array_equal(y[idle], np.broadcast_to(p["out_bias"], y[idle].shape))


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
@pytest.mark.parametrize("activation", ["relu", "silu", "gelu"])
@pytest.mark.parametrize("biases", [True, False])
def test_activations_biases_and_int8(dtype, activation, biases):
    p = layer(1, E=5, B=12, d=40, biases=biases, router=False)
    ffn = SparseFFN(p["up"], p["down"], up_bias=p.get("up_bias"), out_bias=p.get("out_bias"), activation=activation, dtype=dtype)
    x = np.random.default_rng(2).standard_normal((8, 40), dtype=np.float32)
    scores = sparse_scores(3, 8, 5, 0.6)
    y = ffn.experts(x, scores)
    assert rel_err(y, expected(ffn, p, x, scores)) < 1e-5
    if not biases:
        assert not y[1].any()  # zero active experts and no out_bias: exactly zero


# odd shapes: d not a multiple of the vector width or of the column block (512), odd B, E = 1
@pytest.mark.parametrize("E,B,d,L", [(1, 1, 1, 1), (1, 5, 37, 3), (3, 7, 13, 8), (5, 9, 1030, 8), (2, 130, 515, 2), (4, 33, 600, 1)])
@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_odd_shapes(E, B, d, L, dtype):
    p = layer(4, E=E, B=B, d=d)
    ffn = SparseFFN(p["up"], p["down"], up_bias=p["up_bias"], out_bias=p["out_bias"], dtype=dtype)
    x = np.random.default_rng(5).standard_normal((L, d), dtype=np.float32)
    scores = sparse_scores(6, L, E, 0.3)
    assert rel_err(ffn.experts(x, scores), expected(ffn, p, x, scores)) < 1e-5


def test_int8_is_close_to_fp32():
    p = layer(7, E=6, B=32, d=256)
    x = np.random.default_rng(8).standard_normal((8, 256), dtype=np.float32)
    scores = sparse_scores(9, 8, 6, 0.5)
    kw = {"up_bias": p["up_bias"], "out_bias": p["out_bias"]}
    fp32 = SparseFFN(p["up"], p["down"], **kw).experts(x, scores)
    int8 = SparseFFN(p["up"], p["down"], dtype="int8", **kw)
    # a per-row int8 grid moves each weight by at most half a step (max|row| / 254)
    assert np.abs(int8.dequantized()[0] - p["up"]).max() <= np.abs(p["up"]).max() / 254 + 1e-7
    err = rel_err(int8.experts(x, scores), fp32)
    assert 0 < err < 0.02
    assert int8.expert_bytes == 2 * 6 * 32 * 256 + 2 * 6 * 32 * 4
    assert SparseFFN(p["up"], p["down"]).expert_bytes == 2 * 6 * 32 * 256 * 4


def test_quantize_rows_handles_zero_rows():
    w = np.zeros((2, 3, 5), np.float32)
    w[0, 1] = [1.0, -2.0, 0.5, 0.0, 2.0]
    q, scale = quantize_rows(w)
    assert q.dtype == np.int8 and scale.shape == (2, 3)
    assert scale[0, 0] == 0 and not q[0, 0].any()
    np.testing.assert_allclose(q[0, 1] * scale[0, 1], w[0, 1], atol=2.0 / 254)
    assert q[0, 1].max() == 127 and q[0, 1].min() == -127


def test_router_equals_reference():
    p = layer(10, E=12, B=4, d=300)
    ffn = SparseFFN(p["up"], p["down"], router_w=p["router_w"], router_b=p["router_b"], norm_w=p["norm_w"], eps=1e-6)
    x = np.random.default_rng(11).standard_normal((9, 300), dtype=np.float32)
    x[4] = 0.0  # logits = router_b only
    scores = ffn.route(x)
    ref = reference_router(x, p["router_w"], p["router_b"], p["norm_w"], 1e-6)
    assert scores.shape == (9, 12) and scores.dtype == np.float32
    assert rel_err(scores, ref) < 1e-5
    np.testing.assert_array_equal(scores == 0, ref == 0)
    # a token whose logits are all negative has zero active experts
    neg = SparseFFN(p["up"], p["down"], router_w=p["router_w"], router_b=-np.abs(p["router_b"]) - 10)
    assert not neg.route(x[:2]).any()


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_full_layer_and_one_token(dtype):
    p = layer(12, E=8, B=16, d=64)
    ffn = SparseFFN(**p, activation="gelu", dtype=dtype)
    x = np.random.default_rng(13).standard_normal((5, 64), dtype=np.float32)
    scores = ffn.route(x)
    assert 0 < (scores == 0).mean() < 1  # relu made some experts inactive
    y = ffn(x)
    assert rel_err(y, expected(ffn, p, x, scores)) < 1e-5
    # one token as (d,): (E,) scores and (d,) output, the same numbers as row 0 of the chunk
    one = ffn(x[0])
    assert one.shape == (64,) and ffn.route(x[0]).shape == (8,)
    assert rel_err(one, expected(ffn, p, x[:1], scores[:1])[0]) < 1e-5


def test_input_conversion_and_empty_chunk():
    p = layer(14, E=4, B=8, d=24, router=False)
    ffn = SparseFFN(p["up"], p["down"], up_bias=p["up_bias"], out_bias=p["out_bias"])
    x = np.random.default_rng(15).standard_normal((6, 48))[:, ::2]  # float64, not contiguous
    scores = sparse_scores(16, 6, 4, 0.5).astype(np.float64)
    assert rel_err(ffn.experts(x, scores), expected(ffn, p, x, scores)) < 1e-5
    assert ffn.experts(np.zeros((0, 24), np.float32), np.zeros((0, 4), np.float32)).shape == (0, 24)


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
@pytest.mark.parametrize("L", [1, 8])
def test_threads_agree(dtype, L):
    p = layer(17, E=16, B=32, d=1040)
    ffn = SparseFFN(**p, dtype=dtype)
    x = np.random.default_rng(18).standard_normal((L, 1040), dtype=np.float32)
    scores = sparse_scores(19, L, 16, 0.5)
    one, two = ffn.experts(x, scores, threads=1), ffn.experts(x, scores, threads=2)
    assert rel_err(two, one) < 1e-6
    many = np.random.default_rng(20).standard_normal((64, 1040), dtype=np.float32)  # a router large enough for threads
    np.testing.assert_allclose(ffn.route(many, threads=2), ffn.route(many, threads=1), rtol=1e-6, atol=1e-7)
    assert rel_err(SparseFFN(**p, dtype=dtype, threads=2)(x), ffn(x, threads=1)) < 1e-6


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(E=st.integers(1, 6), B=st.integers(1, 20), d=st.one_of(st.integers(1, 90), st.integers(250, 1100)), L=st.integers(1, 12),
       inactive=st.floats(0.0, 1.0), dtype=st.sampled_from(["fp32", "int8"]),
       activation=st.sampled_from(["relu", "silu", "gelu"]), biases=st.booleans(), threads=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**16))
def test_property_matches_reference(E, B, d, L, inactive, dtype, activation, biases, threads, seed):
    p = layer(seed, E=E, B=B, d=d, biases=biases, router=False)
    ffn = SparseFFN(p["up"], p["down"], up_bias=p.get("up_bias"), out_bias=p.get("out_bias"),
                    activation=activation, dtype=dtype, threads=threads)
    x = np.random.default_rng(seed + 1).standard_normal((L, d), dtype=np.float32)
    scores = sparse_scores(seed + 2, L, E, inactive)
    ref = expected(ffn, p, x, scores)
    y = ffn.experts(x, scores)
    # 1e-5 of the output's scale, or of its terms' where they cancel (d = 1: a sum of B products)
    assert np.abs(y - ref).max() <= 1e-5 * max(np.abs(ref).max(), term_scale(ffn, p, x, scores), 1e-6)


def test_bad_input_is_a_user_error():
    p = layer(20, E=3, B=4, d=16, router=False)
    ffn = SparseFFN(p["up"], p["down"])
    x = np.zeros((2, 16), np.float32)
    scores = np.ones((2, 3), np.float32)
    with pytest.raises(UserError, match="dim is 16"):
        ffn.experts(np.zeros((2, 15), np.float32), scores)
    with pytest.raises(UserError, match="float"):
        ffn.experts(x.astype(np.int64), scores)
    with pytest.raises(UserError, match="tokens"):
        ffn.experts(np.zeros((1, 2, 16), np.float32), scores)
    with pytest.raises(UserError, match="scores must have shape"):
        ffn.experts(x, np.ones((2, 4), np.float32))
    with pytest.raises(UserError, match="no router"):
        ffn.route(x)
    with pytest.raises(UserError, match="threads"):
        ffn.experts(x, scores, threads=0)
    with pytest.raises(UserError, match="activation"):
        SparseFFN(p["up"], p["down"], activation="tanh")
    with pytest.raises(UserError, match="dtype"):
        SparseFFN(p["up"], p["down"], dtype="int4")
    with pytest.raises(UserError, match=r"up must have shape \(experts"):
        SparseFFN(p["up"][0], p["down"])
    with pytest.raises(UserError, match="down must have shape"):
        SparseFFN(p["up"], p["down"][:, :3])
    with pytest.raises(UserError, match="router_w"):
        SparseFFN(p["up"], p["down"], norm_w=np.ones(3, np.float32))


def stand_in_module(p: dict, activation: str = "silu"):
    """An object with the attribute names of models.blockffn.BlockFFN (torch tensors)."""
    import torch

    t = {k: torch.nn.Parameter(torch.from_numpy(v)) for k, v in p.items()}
    router = types.SimpleNamespace(weight=t["router_w"], bias=t["router_b"])
    norm = types.SimpleNamespace(weight=t["norm_w"], eps=1e-6)
    return types.SimpleNamespace(router=router, router_norm=norm, up=t["up"], up_bias=t["up_bias"], down=t["down"],
                                 out_bias=t["out_bias"], activation=activation)


def test_from_module_reads_the_blockffn_attributes():
    p = layer(21, E=6, B=8, d=32)
    ffn = SparseFFN.from_module(stand_in_module(p, "relu"), threads=1)
    assert (ffn.activation, ffn.threads, ffn.dim, ffn.num_experts, ffn.expert_size) == ("relu", 1, 32, 6, 8)
    x = np.random.default_rng(22).standard_normal((4, 32), dtype=np.float32)
    scores = reference_router(x, p["router_w"], p["router_b"], p["norm_w"], 1e-6)
    assert rel_err(ffn(x), expected(ffn, p, x, scores)) < 1e-5


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu"])
def test_from_module_matches_the_torch_blockffn(activation):
    blockffn = pytest.importorskip("edgekit.models.blockffn")
    import torch

    torch.manual_seed(0)
    m = blockffn.BlockFFN(48, 6, 8, activation=activation).eval()
    with torch.no_grad():
        m.up_bias.normal_()
        m.out_bias.normal_()
        x = torch.randn(5, 48)
        ref = m(x).numpy()
    assert rel_err(SparseFFN.from_module(m)(x.numpy()), ref) < 1e-5
    assert rel_err(SparseFFN.from_module(m, dtype="int8")(x.numpy()), ref) < 0.05


def test_kernel_info():
    info = kernel_info()
    assert info["simd"] in ("avx512", "avx2", "avx", "sse2", "neon", "sve", "scalar")
    assert info["openmp"] > 0 and info["openmp_max_threads"] >= 1
    assert "-fopenmp" in info["flags"] and os.path.isfile(info["library"])


def test_cached_build_is_reused(monkeypatch):
    path = build.library_path()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert path.parent.parent == build.cached_path().parent.parent and path.name == build.LIB_NAME

    def no_compile(*args, **kwargs):
        raise AssertionError("the cached library was rebuilt")

    monkeypatch.setattr(build, "build_library", no_compile)
    assert build.library_path() == path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest  # the same library file, untouched
    # another source, flags or compiler is another cache entry
    assert build.cache_key(flags=["-O2"]) != build.cache_key()


def test_concurrent_builds_end_with_one_complete_library(tmp_path):
    import ctypes
    from concurrent.futures import ThreadPoolExecutor

    out = tmp_path / "kernels" / build.LIB_NAME
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda _: build.build_library(out=out), range(2)))
    assert done == [out, out]
    assert [f.name for f in out.parent.iterdir()] == [build.LIB_NAME]  # no temporary file left
    assert ctypes.CDLL(str(out)).ek_max_threads() >= 1


def test_build_errors(tmp_path):
    with pytest.raises(UserError, match=r"install gcc \(apt-get install gcc\)"):
        build.build_library(cc="edgekit-no-such-compiler", out=tmp_path / "x.so")
    with pytest.raises(StepFailed, match="no-such-flag"):
        build.build_library(flags=["-fno-such-flag"], out=tmp_path / "x.so")
    assert not list(tmp_path.iterdir())  # the failed build left no temporary file behind
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match="EDGEKIT_CACHE"):
        build.build_library(out=tmp_path / "a-file" / "x.so")


@needs_cross
def test_cross_build_for_arm(tmp_path):
    out = build.build_library(cc=CROSS, flags=ARM_FLAGS, out=tmp_path / "libarm.so")
    header = subprocess.run(["readelf", "-h", str(out)], capture_output=True, text=True, check=True).stdout
    assert "AArch64" in header and "DYN" in header
    data = out.read_bytes()
    assert b"neon" in data and b"avx2" not in data  # ek_simd() of that build


# A tiny driver for the aarch64 build: reads a case file, runs the kernel, writes the result.
DRIVER = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
int ek_experts(int, int, int, int, const float *, const float *, const void *, const float *, const float *,
               const void *, const float *, const float *, int, int, int, float *);
int ek_route(int, int, int, const float *, const float *, const float *, const float *, float, int, float *);
static void *take(FILE *f, size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (bytes && fread(p, 1, bytes, f) != bytes) { fprintf(stderr, "short file\n"); exit(2); }
    return p;
}
int main(int argc, char **argv) {
    for (int i = 1; i + 1 < argc; i += 2) {
        FILE *f = fopen(argv[i], "rb");
        int32_t h[8];
        if (!f || fread(h, 4, 8, f) != 8) return 2;
        const int op = h[0], L = h[1], d = h[2], E = h[3], B = h[4], wt = h[5], act = h[6], threads = h[7];
        const size_t wb = (size_t)E * B * d * (wt ? 1 : 4), rows = (size_t)E * B * 4;
        float *x = take(f, (size_t)L * d * 4), *out;
        size_t n_out;
        if (op == 0) {
            float *s = take(f, (size_t)L * E * 4);
            void *up = take(f, wb); float *us = wt ? take(f, rows) : NULL, *ub = take(f, rows);
            void *dn = take(f, wb); float *ds = wt ? take(f, rows) : NULL, *ob = take(f, (size_t)d * 4);
            n_out = (size_t)L * d;
            out = malloc(n_out * 4);
            if (ek_experts(L, d, E, B, x, s, up, us, ub, dn, ds, ob, wt, act, threads, out)) return 3;
        } else {
            float *w = take(f, (size_t)E * d * 4), *b = take(f, (size_t)E * 4), *nw = take(f, (size_t)E * 4);
            n_out = (size_t)L * E;
            out = malloc(n_out * 4);
            ek_route(L, d, E, x, w, b, nw, 1e-6f, threads, out);
        }
        fclose(f);
        FILE *o = fopen(argv[i + 1], "wb");
        fwrite(out, 4, n_out, o);
        fclose(o);
    }
    return 0;
}
"""


@needs_cross
@needs_qemu
def test_arm_build_computes_the_same_numbers_under_qemu(tmp_path):
    lib = build.build_library(cc=CROSS, flags=ARM_FLAGS, out=tmp_path / "libedgekit_blockffn.so")
    (tmp_path / "driver.c").write_text(DRIVER)
    subprocess.run([CROSS, "-O2", str(tmp_path / "driver.c"), str(lib), "-Wl,-rpath,$ORIGIN", "-o", str(tmp_path / "driver")],
                   check=True, capture_output=True)
    p = layer(23, E=6, B=20, d=1030)
    x = np.random.default_rng(24).standard_normal((8, 1030), dtype=np.float32)
    scores = sparse_scores(25, 8, 6, 0.5)
    cases, args = [], []
    for n, (dtype, act, L, threads) in enumerate([("fp32", 1, 8, 2), ("int8", 2, 1, 1), ("fp32", 0, 3, 1)]):
        ffn = SparseFFN(p["up"], p["down"], up_bias=p["up_bias"], out_bias=p["out_bias"], dtype=dtype,
                        activation=["relu", "silu", "gelu"][act])
        head = np.array([0, L, 1030, 6, 20, int(dtype == "int8"), act, threads], np.int32)
        parts = [head, x[:L], scores[:L], ffn.up, ffn.up_scale, p["up_bias"], ffn.down, ffn.down_scale, p["out_bias"]]
        (tmp_path / f"in{n}").write_bytes(b"".join(a.tobytes() for a in parts if a is not None))
        cases.append((tmp_path / f"out{n}", (L, 1030), expected(ffn, p, x[:L], scores[:L])))
        args += [str(tmp_path / f"in{n}"), str(tmp_path / f"out{n}")]
    route_in = [np.array([1, 8, 1030, 6, 0, 0, 0, 2], np.int32), x, p["router_w"], p["router_b"], p["norm_w"]]
    (tmp_path / "in_route").write_bytes(b"".join(a.tobytes() for a in route_in))
    cases.append((tmp_path / "out_route", (8, 6), reference_router(x, p["router_w"], p["router_b"], p["norm_w"], 1e-6)))
    args += [str(tmp_path / "in_route"), str(tmp_path / "out_route")]
    run = subprocess.run(["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", str(tmp_path / "driver"), *args],
                         check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for out, shape, ref in cases:
        got = np.fromfile(out, np.float32).reshape(shape)
        assert rel_err(got, ref) < 1e-5, out.name
