"""The HLS generator: dataflow plan, g++ C-simulation against the integer reference, estimates.

Graphs are built by hand (random 4-bit weights, random requantization) so these
tests do not depend on the torch lowering.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from edgekit.errors import UserError
from edgekit.fpga.ir import Graph, Layer, Tensor

# .ci/system-packages.sh installs g++; with EDGEKIT_REQUIRE_SYSTEM_TOOLS set these tests fail instead of skipping
NO_GXX = shutil.which("g++") is None and not os.environ.get("EDGEKIT_REQUIRE_SYSTEM_TOOLS")
needs_gxx = pytest.mark.skipif(NO_GXX, reason="g++ is not installed")


class Builder:
    """Hand-built IR graphs with random integer parameters."""

    def __init__(self, seed: int, shape=(3, 16, 16)) -> None:
        self.rng = np.random.default_rng(seed)
        self.tensors = {"x": Tensor("x", tuple(shape), 8, False, 1 / 255)}
        self.layers: list[Layer] = []
        self.weights: dict[str, np.ndarray] = {}

    def shape(self, name: str) -> tuple[int, int, int]:
        return self.tensors[name].shape

    def _tensor(self, name: str, shape, bits=8, signed=False) -> str:
        self.tensors[name] = Tensor(name, tuple(shape), bits, signed, 0.05)
        return name

    def _params(self, name: str, cout: int, fan_in: int, requant: bool) -> None:
        self.weights[f"{name}.bias"] = self.rng.integers(-300, 300, cout).astype(np.int32)
        if requant:
            # spread the outputs over the 8-bit range: |acc| ~ 400 * sqrt(fan_in)
            base = 17 + round(0.5 * math.log2(fan_in))
            self.weights[f"{name}.multiplier"] = self.rng.integers(2**14, 2**15, cout).astype(np.int32)
            self.weights[f"{name}.shift"] = (base + self.rng.integers(-1, 2, cout)).astype(np.int32)

    def conv(self, name, src, cout, kernel=1, stride=1, depthwise=False, relu=True, requant=True) -> str:
        cin, h, w = self.shape(src)
        groups = cin if depthwise else 1
        if depthwise:
            cout = cin
        ho, wo = (h + stride - 1) // stride, (w + stride - 1) // stride
        out = self._tensor(f"{name}_out", (cout, ho, wo), 8 if requant else 32, not relu)
        self.weights[f"{name}.weight"] = self.rng.integers(-7, 8, (cout, cin // groups, kernel, kernel)).astype(np.int8)
        self._params(name, cout, cin // groups * kernel * kernel, requant)
        self.layers.append(Layer(name, "conv", [src], [out], kernel=kernel, stride=stride, groups=groups, relu=relu, requant=requant))
        return out

    def deform(self, name, src, bound, relu=True, offset_weight=None) -> str:
        """Offset conv (3x3 -> dilation in [0, N]) and the square deformable depthwise 3x3."""
        c, h, w = self.shape(src)
        bits = max(1, math.ceil(math.log2(bound + 1)))
        dil = self._tensor(f"{name}_dil", (1, h, w), bits, False)
        off = f"{name}_offset"
        if offset_weight is None:
            self.weights[f"{off}.weight"] = self.rng.integers(-7, 8, (1, c, 3, 3)).astype(np.int8)
            self._params(off, 1, c * 9, True)  # graph(calibrate=...) spreads the dilations over [0, N]
        else:  # dilation = clamp(channel 0 at the centre, 0, N)
            self.weights[f"{off}.weight"] = offset_weight.astype(np.int8)
            self.weights[f"{off}.bias"] = np.zeros(1, np.int32)
            self.weights[f"{off}.multiplier"] = np.full(1, 2**14, np.int32)
            self.weights[f"{off}.shift"] = np.full(1, 14, np.int32)
        self.layers.append(Layer(off, "conv", [src], [dil], kernel=3, clamp=(0, bound), bound=bound))
        out = self._tensor(f"{name}_out", (c, h, w), 8, not relu)
        self.weights[f"{name}.weight"] = self.rng.integers(-7, 8, (c, 1, 3, 3)).astype(np.int8)
        self._params(name, c, 9, True)
        self.layers.append(Layer(name, "deform_dw", [src, dil], [out], kernel=3, groups=c, relu=relu, bound=bound))
        return out

    def upsample(self, name, src) -> str:
        c, h, w = self.shape(src)
        out = self._tensor(f"{name}_out", (c, 2 * h, 2 * w), 8, self.tensors[src].signed)
        self.layers.append(Layer(name, "upsample", [src], [out]))
        return out

    def concat(self, name, srcs) -> str:
        c = sum(self.shape(s)[0] for s in srcs)
        _, h, w = self.shape(srcs[0])
        out = self._tensor(f"{name}_out", (c, h, w), 8, any(self.tensors[s].signed for s in srcs))
        self.layers.append(Layer(name, "concat", list(srcs), [out]))
        return out

    def split(self, name, src) -> tuple[str, str]:
        c, h, w = self.shape(src)
        a = self._tensor(f"{name}_a", (c // 2, h, w), 8, self.tensors[src].signed)
        b = self._tensor(f"{name}_b", (c - c // 2, h, w), 8, self.tensors[src].signed)
        self.layers.append(Layer(name, "split", [src], [a, b]))
        return a, b

    def shuffle(self, name, src, groups=2) -> str:
        out = self._tensor(f"{name}_out", self.shape(src), 8, self.tensors[src].signed)
        self.layers.append(Layer(name, "shuffle", [src], [out], groups=groups))
        return out

    def graph(self, outputs, calibrate: tuple[str, ...] = ()) -> Graph:
        g = Graph("x", list(outputs), dict(self.tensors), list(self.layers), dict(self.weights), {"name": "test"})
        for name in calibrate:
            self._spread_dilation(g, name)
        g.validate()
        return g

    def _spread_dilation(self, g: Graph, deform: str) -> None:
        """Bias and shift of an offset conv so that its dilations cover [0, N] on random images."""
        from edgekit.fpga.reference import conv, run_graph

        off = next(layer for layer in g.layers if layer.name == f"{deform}_offset")
        image = self.rng.integers(0, 256, g.tensor("x").shape).astype(np.uint8)
        x = run_graph(g, image)[off.inputs[0]]
        w = g.weights
        acc = conv(x, w[f"{off.name}.weight"], np.zeros(1, np.int64), 1, 1).reshape(-1)
        bias = -int(np.percentile(acc, 25))  # a quarter of the pixels at d = 0
        top = max(float(np.percentile(acc, 85)) + bias, 1.0)  # the top ~15% clamp to d = N
        m = int(w[f"{off.name}.multiplier"][0])
        w[f"{off.name}.bias"] = np.array([bias], np.int32)
        w[f"{off.name}.shift"] = np.array([max(1, round(math.log2(m * top / off.bound)))], np.int32)


def every_kind_graph(seed: int = 0) -> Graph:
    """Every layer kind, fused and unfused paths, stride 2, forks, int32 and 8-bit outputs."""
    b = Builder(seed)
    a = b.conv("stem", "x", 8, kernel=3)  # full 3x3 stride 1
    a1, a2 = b.split("split", a)
    a1 = b.conv("dw0", a1, 0, kernel=3, depthwise=True)  # unfused depthwise (input from a split)
    m = b.conv("pw1", a2, 8)  # fused: 1x1 -> dw 3x3
    c = b.conv("dw1", m, 0, kernel=3, depthwise=True, relu=False)
    d = b.conv("pw2", c, 4)  # standalone 1x1 on a signed tensor
    f = b.shuffle("shuffle", b.concat("cat1", [a1, d]))
    g = b.conv("down", f, 16, kernel=3, stride=2)  # full 3x3 stride 2
    h = b.conv("dws2", f, 0, kernel=3, stride=2, depthwise=True)  # dw 3x3 stride 2
    p = b.conv("pws2", f, 4, stride=2)  # 1x1 stride 2
    i = b.concat("cat2", [g, h, p])  # three inputs: a chain of two concats
    j = b.conv("pw3", i, 8)  # fused: 1x1 -> offset conv + deformable dw
    k = b.deform("def1", j, bound=2)
    up = b.upsample("up", k)
    n = b.deform("def2", b.concat("cat3", [up, f]), bound=3, relu=False)  # deformable engine without a 1x1 stage
    hm = b.conv("head_hm", n, 3, relu=False, requant=False)  # int32 heads, 1x1 and 3x3
    wh = b.conv("head_wh", n, 2, kernel=3, relu=False, requant=False)
    return b.graph([hm, wh, k], calibrate=("def1", "def2"))


N_BOUND = 3


def deform_border_graph(seed: int = 1) -> Graph:
    """Both deformable engines; each dilation is the (clamped) value of image channel 0."""
    b = Builder(seed, shape=(3, 12, 14))

    def centre_of_channel_0(channels: int) -> np.ndarray:
        w = np.zeros((1, channels, 3, 3))
        w[0, 0, 1, 1] = 1
        return w

    plain = b.deform("deform", "x", bound=N_BOUND, offset_weight=centre_of_channel_0(3))  # no 1x1 stage
    mid = b.conv("pw", "x", 4)  # channel 0 of the 1x1 output copies image channel 0
    wt = b.weights["pw.weight"]
    wt[0] = 0
    wt[0, 0, 0, 0] = 1
    b.weights["pw.bias"][0] = 0
    b.weights["pw.multiplier"][0] = 2**14
    b.weights["pw.shift"][0] = 14
    fused = b.deform("deform_pw", mid, bound=N_BOUND, offset_weight=centre_of_channel_0(4))
    return b.graph([plain, fused])


def border_image(rng: np.random.Generator, shape=(3, 12, 14)) -> np.ndarray:
    """Channel 0 sets the dilation: N on every border pixel and at some interior ones, 0 at others."""
    img = rng.integers(0, 256, shape).astype(np.uint8)
    d = rng.integers(0, N_BOUND + 3, shape[1:])  # values above N clamp to N
    d[0, :] = d[-1, :] = d[:, 0] = d[:, -1] = N_BOUND
    d[shape[1] // 2, shape[2] // 2] = N_BOUND
    d[2, 5] = 0
    img[0] = d
    return img


# ------------------------------------------------------------------ plan


def test_plan_fuses_the_codenet_engines_and_forks_shared_tensors():
    from edgekit.fpga.dataflow import build_plan

    plan = build_plan(every_kind_graph())
    kinds = {p.name: p.kind for p in plan.processes}
    layers = {p.kind: [layer.name for layer in p.layers] for p in plan.processes}
    assert kinds["dw1"] == "engine_pw_dw" and layers["engine_pw_dw"] == ["pw1", "dw1"]
    assert kinds["def1"] == "engine_pw_deform" and layers["engine_pw_deform"] == ["pw3", "def1_offset", "def1"]
    assert kinds["def2"] == "engine_deform" and layers["engine_deform"] == ["def2_offset", "def2"]
    assert kinds["dw0"] == "dw_3x3" and kinds["dws2"] == "dw_3x3" and kinds["down"] == "conv_3x3"
    assert kinds["pw2"] == "conv_1x1" and kinds["pws2"] == "conv_1x1" and kinds["head_wh"] == "conv_3x3"
    # channel routing: concat -> shuffle is one route, a three-input concat one route with three input streams
    routes = {p.name: p for p in plan.processes if p.kind == "route"}
    assert {name: [layer.name for layer in p.layers] for name, p in routes.items()} == {
        "split": ["split"], "shuffle": ["cat1", "shuffle"], "cat2": ["cat2"], "cat3": ["cat3"]}
    assert routes["cat2"].in_tensors == ["down_out", "dws2_out", "pws2_out"] and routes["cat2"].out_tensors == ["cat2_out"]
    assert routes["split"].out_tensors == ["split_a", "split_b"] and "cat1_out" not in {s.tensor for s in plan.streams.values()}
    # shuffle(concat(a, b)) with 4 + 4 channels interleaves them: output k reads (k % 2, k // 2)
    assert routes["shuffle"].routes == [[(k % 2, k // 2) for k in range(8)]]
    # f is read by down, dws2, pws2 and cat3: three chained forks; def2's output by two heads
    forks = [p for p in plan.processes if p.kind == "fork_2"]
    assert sorted(p.in_tensors[0] for p in forks).count("shuffle_out") == 3
    assert sum(p.in_tensors[0] == "def2_out" for p in forks) == 1
    # each stream has one producer and one consumer; an output also read by a layer is forked
    assert sum(p.in_tensors[0] == "def1_out" for p in forks) == 1
    engine = next(p for p in plan.processes if p.name == "def2")
    assert engine.rows == 2 * 3 + 1 and engine.lag == 3
    # the bypass into cat3 waits for the deformable branch: its stream is deeper than the default
    cat3 = next(p for p in plan.processes if p.name == "cat3")
    assert plan.streams[cat3.inputs[1]].depth > plan.streams[cat3.inputs[0]].depth


def test_a_1x1_conv_read_elsewhere_is_not_fused():
    from edgekit.fpga.dataflow import build_plan

    b = Builder(3)
    m = b.conv("pw", "x", 8)
    c = b.conv("dw", m, 0, kernel=3, depthwise=True)
    plan = build_plan(b.graph([c, m]))  # m is also a graph output
    assert {p.name: p.kind for p in plan.processes}["dw"] == "dw_3x3"


def test_a_dilation_not_from_an_offset_conv_is_a_clear_error():
    from edgekit.fpga.dataflow import build_plan

    b = Builder(4)
    j = b.conv("pw", "x", 4)
    k = b.deform("def", j, bound=2)
    g = b.graph([k])
    g.layers[-1].inputs = [j, "x"]  # dilation read from the wrong tensor
    g.tensors["x"] = Tensor("x", (3, 16, 16), 8, False, 1 / 255)
    with pytest.raises(UserError, match="offset conv"):
        build_plan(g)


def shufflenet_graph(seed: int = 2) -> Graph:
    """ShuffleNetV2-style units: a stride-2 unit, two stride-1 units (split halves to different
    consumers), then channel routing with a three-input concat, a 3-group shuffle, a routed
    tensor also read outside its chain, and an unused split half."""
    b = Builder(seed, shape=(3, 16, 16))
    x = b.conv("stem", "x", 8, kernel=3)
    left = b.conv("u0_left_pw", b.conv("u0_left_dw", x, 0, kernel=3, stride=2, depthwise=True), 8)
    right = b.conv("u0_right_dw", b.conv("u0_right_pw", x, 8), 0, kernel=3, stride=2, depthwise=True)
    t = b.shuffle("u0_shuffle", b.concat("u0_cat", [left, b.conv("u0_right_pw2", right, 8)]))
    for k in (1, 2):  # stride-1 units: the first half bypasses, the second goes through the branch
        keep, work = b.split(f"u{k}_split", t)
        work = b.conv(f"u{k}_pw2", b.conv(f"u{k}_dw", b.conv(f"u{k}_pw", work, 8), 0, kernel=3, depthwise=True), 8)
        t = b.shuffle(f"u{k}_shuffle", b.concat(f"u{k}_cat", [keep, work]))
    keep, work = b.split("u3_split", t)  # 8 + 8 channels
    side = b.conv("side", t, 4)  # t is read by the chain and by this conv: a fork
    three = b.concat("cat3", [keep, b.conv("u3_pw", work, 8), side])  # 20 channels
    mixed = b.shuffle("mix", three, groups=4)
    _, unused = b.split("last_split", mixed)  # the first half is read by nobody
    head = b.conv("head", unused, 3, relu=False, requant=False)
    return b.graph([head, mixed])  # mixed: a graph output inside a chain


def test_a_shufflenet_unit_becomes_one_route_process():
    from edgekit.fpga.dataflow import build_plan
    from edgekit.fpga.reference import run_graph

    graph = shufflenet_graph()
    plan = build_plan(graph)
    routes = [p for p in plan.processes if p.kind == "route"]
    assert [[layer.name for layer in p.layers] for p in routes] == [
        ["u0_cat", "u0_shuffle", "u1_split"],  # concat -> shuffle -> split of the next unit: one process
        ["u1_cat", "u1_shuffle", "u2_split"],  # u1_cat waits for the branch u1_split feeds: a new route
        ["u2_cat", "u2_shuffle", "u3_split"],
        ["cat3", "mix", "last_split"],
    ]
    assert {p.kind for p in plan.processes}.isdisjoint({"concat", "split", "shuffle", "concat_2", "split_2"})
    first = routes[0]
    assert first.in_tensors == ["u0_left_pw_out", "u0_right_pw2_out"] and first.out_tensors == ["u1_split_a", "u1_split_b"]
    # no stream carries a tensor inside a chain; a chain tensor read outside it is an output (forked to its readers)
    streamed = {s.tensor for s in plan.streams.values()}
    assert not streamed & {"u0_cat_out", "u0_shuffle_out", "u1_cat_out", "cat3_out", "last_split_a"}
    assert routes[2].out_tensors == ["u2_shuffle_out", "u3_split_a", "u3_split_b"]
    assert routes[3].out_tensors == ["mix_out", "last_split_b"] and routes[3].in_tensors == ["u3_split_a", "u3_pw_out", "side_out"]
    assert sum(p.kind == "fork_2" and p.in_tensors == ["u2_shuffle_out"] for p in plan.processes) == 0  # one reader outside
    # the plan's channel maps reproduce the reference on every routed tensor
    image = random_images(1)[0]
    env = run_graph(graph, image)
    for p in routes:
        for name, route in zip(p.out_tensors, p.routes):
            got = np.stack([env[p.in_tensors[slot]][c] for slot, c in route])
            assert np.array_equal(got, env[name]), name


def test_a_route_costs_its_registers_and_no_intermediate_fifo():
    from edgekit.fpga.estimate import CTRL_FF, CTRL_LUT, estimate

    est = estimate(shufflenet_graph(), "ultra96v2", 200, parallelism=1)
    row = {r.name: r for r in est.rows}
    plan = est.plan
    first = next(p for p in plan.processes if p.kind == "route")
    # two 8-channel 8-bit inputs and two 8-channel outputs at 8x8 pixels; two input FIFOs of depth 3
    # (shift registers: one LUT per bit, plus an output register)
    assert plan.streams[first.inputs[0]].depth == plan.streams[first.inputs[1]].depth == 3
    assert row[first.name].ff == CTRL_FF + 2 * 64 + 2 * 64 + 2 * 64
    assert row[first.name].lut == CTRL_LUT + 2 * 64 and row[first.name].dsp == row[first.name].bram_18k == 0
    assert row[first.name].cycles == 8 * 8 + 6


# ------------------------------------------------------------------ C-simulation


def random_images(n: int, shape=(3, 16, 16), seed: int = 7) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape).astype(np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def every_kind_project(tmp_path_factory):
    """The every-kind graph written and C-simulated once (sanitized, -O1) for the tests below."""
    if NO_GXX:
        pytest.skip("g++ is not installed")
    from edgekit.fpga.csim import run_csim
    from edgekit.fpga.hls import write_project

    graph = every_kind_graph()
    project = write_project(graph, tmp_path_factory.mktemp("hls") / "prj", "ultra96v2", 200)
    images = random_images(3)
    result = run_csim(project, graph, images, sanitize=True)
    return graph, project, images, result


@needs_gxx
def test_csim_of_every_layer_kind_equals_the_reference_on_every_value(every_kind_project):
    from edgekit.fpga.reference import run_graph

    graph, _, images, result = every_kind_project
    sizes = sum(int(np.prod(graph.tensor(n).shape)) for n in graph.outputs)
    assert result.passed, result.stdout_tail
    assert (result.images, result.values, result.mismatches) == (3, 3 * sizes, 0)
    assert "PASS" in result.stdout_tail
    # the outputs are not degenerate: int32 heads spread widely, the 8-bit output varies
    env = run_graph(graph, images[0])
    assert np.ptp(env["head_hm_out"]) > 255 and len(np.unique(env["def1_out"])) > 20


@needs_gxx
def test_generated_code_compiles_without_warnings(every_kind_project, tmp_path):
    from edgekit.fpga.csim import ap_types_dir

    _, project, _, result = every_kind_project
    # the fixture's fresh project was really built (its build stamp exists), with -Wall -Wextra
    # (-Wno-unknown-pragmas), and the compiler printed nothing
    assert result.binary.with_suffix(".sha256").is_file() and result.compiler_stderr == ""
    # without -Wno-unknown-pragmas the only warnings are g++ ignoring '#pragma HLS'
    proc = subprocess.run(
        ["g++", "-std=c++14", "-Wall", "-Wextra", "-DEDGEKIT_CSIM", "-fsyntax-only", "-isystem", str(ap_types_dir()),
         "tb/testbench.cpp", "firmware/edgekit_top.cpp"], cwd=project, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "warning:" in line]
    assert warnings and all("ignoring" in w and "#pragma HLS" in w for w in warnings), warnings[:5]


@needs_gxx
def test_testbench_exits_non_zero_when_one_expected_value_is_wrong(every_kind_project):
    from edgekit.fpga.csim import parse_summary, run_testbench

    graph, project, _, result = every_kind_project
    expected = project / "tb_data" / "expected_1.bin"
    original = expected.read_bytes()
    values = np.frombuffer(original, "<i4").copy()
    _, h, w = graph.tensor("head_hm_out").shape
    index = 1 * h * w + 5 * w + 9  # head_hm_out, channel 1, y 5, x 9
    values[index] += 1
    expected.write_bytes(values.tobytes())
    try:
        proc, _ = run_testbench(project, result.binary, 3)
    finally:
        expected.write_bytes(original)
    assert proc.returncode == 1
    assert parse_summary(proc.stdout) == (3, result.values, 1)
    got = values[index] - 1
    assert f"MISMATCH image 1 output head_hm_out c=1 y=5 x=9 got={got} expected={got + 1}" in proc.stdout
    proc, _ = run_testbench(project, result.binary, 3)  # restored: passes again
    assert proc.returncode == 0


@needs_gxx
def test_csim_of_shufflenet_routing_equals_the_reference(tmp_path):
    from edgekit.fpga.csim import run_csim
    from edgekit.fpga.hls import write_project

    graph = shufflenet_graph()
    project = write_project(graph, tmp_path / "prj", "ultra96v2", 200)
    routes = (project / "firmware" / "routes.h").read_text()
    assert routes.count("static void route_") == 4 and "o0.d[2 * c] = i0.d[c];" in routes  # shuffle(concat): one run per input
    result = run_csim(project, graph, random_images(3, seed=5), sanitize=True, optimize=False)
    assert result.passed and result.mismatches == 0 and result.images == 3, result.stdout_tail
    assert result.compiler_stderr == ""


@needs_gxx
def test_largest_offset_at_the_borders_is_exact_in_both_deformable_engines(tmp_path):
    from edgekit.fpga.csim import run_csim
    from edgekit.fpga.dataflow import build_plan
    from edgekit.fpga.hls import write_project
    from edgekit.fpga.reference import requantize, run_graph

    graph = deform_border_graph()
    kinds = {p.name: p.kind for p in build_plan(graph).processes}
    assert kinds["deform"] == "engine_deform" and kinds["deform_pw"] == "engine_pw_deform"
    rng = np.random.default_rng(11)
    images = [border_image(rng) for _ in range(4)]
    n = N_BOUND
    for name in ("deform_dil", "deform_pw_dil"):  # d = N on every border pixel, 0 and N inside
        d = run_graph(graph, images[0])[name][0]
        assert (d[0] == n).all() and (d[-1] == n).all() and (d[:, 0] == n).all() and (d[:, -1] == n).all()
        assert d[6, 7] == n and d[2, 5] == 0 and set(np.unique(d)) == set(range(n + 1))
    # independent check of the geometry at a corner: with d = N only taps (0,0), (0,N), (N,0), (N,N) are inside
    x, wt = images[0].astype(np.int64), graph.weights
    acc = wt["deform.bias"].astype(np.int64) + sum(
        wt["deform.weight"][:, 0, 1 + i, 1 + j].astype(np.int64) * x[:, i * n, j * n] for i in (0, 1) for j in (0, 1))
    corner = requantize(acc.reshape(-1, 1, 1), wt["deform.multiplier"], wt["deform.shift"], 0, 255).reshape(-1)
    assert (run_graph(graph, images[0])["deform_out"][:, 0, 0] == corner).all()

    project = write_project(graph, tmp_path / "prj", "ultra96v2")
    result = run_csim(project, graph, images, sanitize=True, optimize=False)
    assert result.passed and result.mismatches == 0 and result.images == 4, result.stdout_tail
    defines = (project / "firmware" / "defines.h").read_text()
    assert defines.count(f"ROWS = {2 * n + 1}, LAG = {n};") == 5  # both engines: (1x1,) offset conv, deform


@needs_gxx
def test_a_line_buffer_one_row_short_gets_the_largest_offset_wrong(tmp_path):
    """The published buffer of 2N rows is exact only up to N-1: the same test must catch it."""
    from edgekit.fpga.csim import run_csim
    from edgekit.fpga.hls import write_project

    graph = deform_border_graph()
    project = write_project(graph, tmp_path / "prj", "ultra96v2")
    defines = project / "firmware" / "defines.h"
    n = N_BOUND
    text = defines.read_text()
    defines.write_text(text.replace(f"ROWS = {2 * n + 1}, LAG = {n};", f"ROWS = {2 * n}, LAG = {n};"))
    rng = np.random.default_rng(11)
    result = run_csim(project, graph, [border_image(rng) for _ in range(2)], sanitize=False, optimize=False)
    assert result.returncode == 1 and result.mismatches > 0
    assert "MISMATCH image 0 output deform_out" in result.stdout_tail


def test_csim_rejects_images_of_the_wrong_shape(tmp_path):
    from edgekit.fpga.csim import run_csim
    from edgekit.fpga.hls import write_project

    graph = deform_border_graph()
    project = write_project(graph, tmp_path / "prj", "ultra96v2")
    with pytest.raises(UserError, match=r"image 0 has shape \(3, 16, 16\)"):
        run_csim(project, graph, random_images(1))


# ------------------------------------------------------------------ project files


def test_project_follows_the_board_clock_and_parallelism(tmp_path):
    import json

    from edgekit.fpga.hls import write_project

    graph = every_kind_graph()
    project = write_project(graph, tmp_path / "prj", "pynq-z2", 125, top="net_top", parallelism={"pw1": 8, "down": 24, "def1": 12})
    tcl = (project / "build_prj.tcl").read_text()
    assert "set part {xc7z020clg400-1}" in tcl and "set clock_period 8.000" in tcl and "create_clock -period $clock_period" in tcl
    for step in ("csim_design", "csynth_design", "cosim_design", "export_design", "set_top net_top", "add_files -tb tb_data"):
        assert step in tcl
    assert "vitis_hls -f build_prj.tcl" in (project / "README.txt").read_text()
    defines = (project / "firmware" / "defines.h").read_text()
    lanes = {m[0]: (int(m[1]), int(m[2])) for m in re.findall(r"struct cfg_(\w+) \{[^}]*?PO = (\d+), PI = (\d+);", defines)}
    assert lanes["pw1"][0] * lanes["pw1"][1] == 8  # 1x1: PO x PI MACs per cycle
    assert 3 * lanes["down"][0] * lanes["down"][1] == 24  # 3x3: 3 kernel rows x PO x PI
    assert lanes["def1"] == (4, 1) and lanes["def1_offset"] == (1, 4)  # the offset conv reads with the deform's lanes
    top = (project / "firmware" / "net_top.cpp").read_text()
    po, pi = lanes["pw1"]
    for factor, dim in ((po, 1), (pi, 2)):
        if factor > 1:
            assert f"ARRAY_RESHAPE variable=w_pw1 cyclic factor={factor} dim={dim}" in top
    assert "#pragma HLS DATAFLOW" in top and "#pragma HLS INTERFACE s_axilite port=return bundle=control" in top
    assert "#pragma HLS INTERFACE m_axi port=image offset=slave bundle=gmem0 depth=768" in top
    assert top.count("edgekit::fork_2<") == 5 and "edgekit::engine_pw_deform<cfg_pw3, cfg_def1_offset, cfg_def1>" in top
    report = json.loads((project / "estimate.json").read_text())
    assert report["board"] == "pynq-z2" and report["parallelism"]["pw1"] == 8 and report["parallelism"]["down"] == 24


def test_weight_headers_hold_the_ir_integers(tmp_path):
    from edgekit.fpga.hls import write_project

    graph = every_kind_graph()
    project = write_project(graph, tmp_path / "prj", "ultra96v2")
    text = (project / "firmware" / "weights" / "pw2.h").read_text()
    numbers = [int(v) for v in re.findall(r"-?\d+", text.split("w_pw2[4][8][1][1] =")[1].split(";")[0])]
    assert numbers == graph.weights["pw2.weight"].reshape(-1).tolist()
    assert f"m_pw2[4] = {{{', '.join(map(str, graph.weights['pw2.multiplier']))}}}" in text
    head = (project / "firmware" / "weights" / "head_hm.h").read_text()
    assert "raw int32 output" in head


# ------------------------------------------------------------------ estimate and boards


def test_more_parallelism_means_fewer_cycles_and_more_dsp():
    from edgekit.fpga.estimate import estimate

    graph = every_kind_graph()
    slow = estimate(graph, "ultra96v2", 200, parallelism=1)
    fast = estimate(graph, "ultra96v2", 200, parallelism=16)
    assert fast.interval_cycles < slow.interval_cycles and fast.fps > slow.fps
    assert fast.totals["dsp"] > slow.totals["dsp"] and fast.latency_cycles < slow.latency_cycles
    row = {r.name: r for r in slow.rows}["down"]
    row16 = {r.name: r for r in fast.rows}["down"]
    assert row.lanes == 3 and row16.lanes == 12  # 3 rows x PO x PI <= 16; 16*8*9 MACs over 8x8 pixels
    assert row.macs == row16.macs == 16 * 8 * 9 * 8 * 8 and row16.cycles < row.cycles and row16.dsp > row.dsp
    # the model's cycle count for a 3x3 conv: (H+1)(W+1) steps, stores of 8 channels, 3*(16/PO)*(8/PI) MAC cycles
    assert row.cycles == 17 * 17 + 16 * 16 * (8 + 6) + 8 * 8 * (3 * 16 * 8 + 6)
    assert slow.macs == sum(r.macs for r in slow.rows) > 0 and "| down | conv_3x3 | down |" in slow.table()


def test_automatic_parallelism_balances_within_the_board():
    from edgekit.fpga.estimate import estimate

    graph = every_kind_graph()
    auto = estimate(graph, "ultra96v2", 200)
    one = estimate(graph, "ultra96v2", 200, parallelism=1)
    assert auto.totals["dsp"] <= 360 and auto.fps > 2 * one.fps
    summary = auto.summary()
    assert summary["board"] == "ultra96v2" and summary["fps"] == round(auto.fps, 2) and 0 < summary["utilization"]["dsp"] <= 1
    assert auto.bottleneck in {r.name for r in auto.rows}


def big_graph() -> Graph:
    b = Builder(5, shape=(3, 512, 512))
    a = b.conv("stem", "x", 64, kernel=3, stride=2)
    a = b.conv("pw", a, 128)
    a = b.deform("deform", a, bound=8)
    return b.graph([b.conv("head", a, 4, relu=False, requant=False)])


def test_a_design_too_big_for_the_board_is_a_clear_error():
    from edgekit.fpga.estimate import estimate

    graph = big_graph()
    with pytest.raises(UserError, match=r"needs [\d,]+ DSP but pynq-z2 \(xc7z020clg400-1\) has 220.*parallelism.*bigger board"):
        estimate(graph, "pynq-z2", 100, parallelism={"pw": 256})
    # 17 line-buffer rows of 256 pixels x 128 channels: more BRAM than the PYNQ-Z2 has, even at one lane
    with pytest.raises(UserError, match=r"needs [\d,]+ BRAM_18K but pynq-z2 .* has 280; use a smaller input image"):
        estimate(graph, "pynq-z2", 100, parallelism=1)
    assert estimate(graph, "zcu102", 250).totals["bram_18k"] <= 1824
    # for a report, the same estimate without the error
    report = estimate(graph, "pynq-z2", 100, parallelism=1, check_fit=False)
    assert not report.fits and "bram_18k" in report.overflows and report.summary()["fits"] is False


def test_board_presets():
    from edgekit.fpga.boards import get_board

    u96 = get_board("Ultra96V2")
    assert (u96.part, u96.dsp, u96.bram_18k, u96.lut, u96.ff) == ("xczu3eg-sbva484-1-i", 360, 432, 70_560, 141_120)
    z2 = get_board("pynq_z2")
    assert (z2.part, z2.dsp, z2.bram_18k, z2.lut, z2.ff) == ("xc7z020clg400-1", 220, 280, 53_200, 106_400)
    z104 = get_board("zcu104")
    assert (z104.part, z104.dsp, z104.bram_18k, z104.uram, z104.lut, z104.ff) == ("xczu7ev-ffvc1156-2-e", 1_728, 624, 96, 230_400, 460_800)
    with pytest.raises(UserError, match="unknown FPGA board 'de10'; valid boards: ultra96v2, pynq-z2, zcu104"):
        get_board("de10")
