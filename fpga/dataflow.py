"""The process network of the generated HLS design.

Decides which IR layers run in which dataflow process, the streams between the
processes (with forks for tensors read twice) and each MAC stage's parallel
lanes. ``fpga/hls.py`` writes C++ from a :class:`Plan`; ``fpga/estimate.py``
prices the same plan, so the estimate describes the code that is written.

Processes (templates in ``hls_templates.ENGINE_H``):

- ``engine_pw_deform``: 1x1 conv -> requantize -> line buffer of 2N+1 rows ->
  offset conv -> dilation -> deformable depthwise 3x3 -> requantize, for a
  1x1 conv whose output only the offset conv and the deform_dw read;
  ``engine_deform`` the same without the 1x1 stage;
- ``engine_pw_dw``: 1x1 conv -> requantize -> 3-row line buffer -> depthwise
  3x3 stride 1, for a 1x1 conv whose output only that depthwise conv reads;
- ``conv_1x1``, ``conv_3x3`` (full), ``dw_3x3`` (stride 1 or 2) for the rest;
- ``upsample_2x``;
- ``route``: a maximal chain of channel-routing layers (concat, split,
  shuffle) as one process: per pixel it reads each of its k input streams
  once and writes its m output streams, output channel j of stream i being
  input channel ``routes[i][j] = (input slot, channel)``, a map fixed at plan
  time (``hls.py`` writes it as unrolled assignments). Its outputs are the
  chain's tensors read outside it; tensors only the chain reads get no stream.
  Routing layers join one chain only while the process network stays acyclic
  (a ShuffleNet unit's concat -> shuffle -> split is one route; the next
  concat, which waits for the branch fed by that split, starts the next);
- ``fork_2`` (a tensor read by k processes: a chain of k-1 forks), ``drain``
  (a tensor nobody reads), ``read_input`` / ``write_output`` (m_axi, CHW).

Lanes: a stage computes ``po`` output channels x ``pi`` input channels (x 3
kernel rows for a 3x3) MACs per cycle; depthwise stages have ``pi = 1``; the
offset conv of an engine reads the line buffer with the deform stage's lanes.
"""

from __future__ import annotations

import heapq
import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from edgekit.fpga.ir import Graph, Layer, Tensor

from edgekit.errors import UserError

ROUTING = ("concat", "split", "shuffle")  # layers that only permute channels
MAX_SHIFT = 47  # the C++ requantizes in 48 bits: exact for |acc * M| < 2^46 and S <= 47
FIFO_DEPTH = 3  # default stream depth (3: Vivado maps shift registers of 3 or more to LUT SRLs, not whole-pixel-wide flip-flops); joins add their skew


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class Stage:
    """One MAC stage (an IR conv or deform_dw layer) inside a process."""

    layer: Layer
    role: str  # "conv" (1x1 or full 3x3), "dw" (depthwise or deformable 3x3), "offset" (the engine's offset conv)
    cin: int
    cout: int
    kernel: int
    h: int  # input grid
    w: int
    ho: int  # output grid
    wo: int
    po: int = 1
    pi: int = 1

    @property
    def depthwise(self) -> bool:
        return self.role == "dw"

    @property
    def rows_per_cycle(self) -> int:
        return 3 if self.kernel == 3 else 1

    @property
    def lanes(self) -> int:
        """MACs per cycle."""
        return self.po * self.pi * self.rows_per_cycle

    @property
    def trips(self) -> int:
        """Cycles of the stage's pipelined loop per output pixel."""
        cin_groups = 1 if self.depthwise else self.cin // self.pi
        return (self.cout // self.po) * cin_groups * (3 if self.kernel == 3 else 1)

    @property
    def macs_per_pixel(self) -> int:
        return self.cout * (1 if self.depthwise else self.cin) * self.kernel**2

    @property
    def macs(self) -> int:
        return self.macs_per_pixel * self.ho * self.wo

    @property
    def requant(self) -> bool:
        return self.layer.requant

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.cout, 1 if self.depthwise else self.cin, self.kernel, self.kernel)

    def options(self) -> list[tuple[int, int]]:
        """(po, pi) choices in increasing lanes; for each lane count the widest input side."""
        if self.depthwise:
            return [(d, 1) for d in divisors(self.cout)]
        if self.role == "offset":
            return [(1, self.pi)]  # follows the deform stage
        best: dict[int, tuple[int, int]] = {}
        for po in divisors(self.cout):
            for pi in divisors(self.cin):
                if po * pi not in best or pi > best[po * pi][1]:
                    best[po * pi] = (po, pi)
        return [best[k] for k in sorted(best)]


@dataclass
class Process:
    name: str  # C++ identifier, unique
    kind: str
    layers: list[Layer] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # stream names
    outputs: list[str] = field(default_factory=list)
    in_tensors: list[str] = field(default_factory=list)  # IR tensor of each input stream
    out_tensors: list[str] = field(default_factory=list)
    lag: int = 0  # rows (and columns) the window looks ahead; 0: no line buffer
    rows: int = 0  # line-buffer rows
    routes: list[list[tuple[int, int]]] = field(default_factory=list)  # route: per output stream, (input slot, channel) per channel

    def stage(self, role: str) -> Stage | None:
        return next((s for s in self.stages if s.role == role), None)

    @property
    def pw(self) -> Stage | None:
        return self.stages[0] if self.kind.startswith("engine_pw") else None


@dataclass
class Stream:
    name: str
    tensor: str
    producer: str
    consumer: str
    depth: int = FIFO_DEPTH


@dataclass
class Plan:
    graph: Graph
    tensors: dict[str, Tensor]  # the graph's tensors
    processes: list[Process]
    streams: dict[str, Stream]
    ids: dict[str, str]  # IR name -> C++ identifier

    def stages(self) -> list[Stage]:
        return [s for p in self.processes for s in p.stages]

    def stage_of(self, layer_name: str) -> Stage | None:
        return next((s for s in self.stages() if s.layer.name == layer_name), None)

    def set_lanes(self, stage: Stage, po: int, pi: int) -> None:
        stage.po, stage.pi = po, pi
        if stage.role == "dw":  # an engine's offset conv reads the line buffer with the same lanes
            for p in self.processes:
                if stage in p.stages and (off := p.stage("offset")) is not None:
                    off.pi = po


class _Ids:
    """IR names -> unique C++ identifiers."""

    def __init__(self) -> None:
        self.map: dict[str, str] = {}
        self.used: set[str] = set()

    def __call__(self, name: str, prefix: str = "", ns: str = "") -> str:
        key = ns + prefix + name
        if key in self.map:
            return self.map[key]
        base = prefix + re.sub(r"[^0-9A-Za-z_]", "_", name).strip("_")
        base = re.sub(r"__+", "_", base) or "x"
        if base[0].isdigit():
            base = "n" + base
        ident, k = base, 1
        while ident in self.used:
            k += 1
            ident = f"{base}_{k}"
        self.used.add(ident)
        self.map[key] = ident
        return ident


def _check_layers(graph: Graph) -> None:
    """The layer shapes the generated engine supports; anything else is a clear error."""
    graph.validate()
    t = graph.tensor
    for layer in graph.layers:
        where = f"IR layer {layer.name}" + (f" ({layer.source})" if layer.source else "")
        if layer.kind == "conv":
            cin, cout = t(layer.inputs[0]).shape[0], t(layer.outputs[0]).shape[0]
            if layer.kernel not in (1, 3) or layer.stride not in (1, 2):
                raise UserError(f"{where}: the HLS engine supports 1x1 and 3x3 convs with stride 1 or 2, not {layer.kernel}x{layer.kernel} stride {layer.stride}")
            if layer.groups not in (1, cin) or (layer.groups == cin != 1 and (cout != cin or layer.kernel != 3)):
                raise UserError(f"{where}: groups={layer.groups} is not supported; use dense convs or depthwise 3x3 with one output per channel")
        if layer.kind == "deform_dw" and layer.groups not in (1, t(layer.inputs[0]).shape[0]):
            raise UserError(f"{where}: deform_dw must be depthwise")
        if layer.kind in ("conv", "deform_dw"):
            if not layer.requant and t(layer.outputs[0]).bits < 32:
                raise UserError(f"{where}: a conv without requantization must output a 32-bit tensor")
            if layer.requant and graph.weights[f"{layer.name}.shift"].max() > MAX_SHIFT:
                raise UserError(f"{where}: requantization shift above {MAX_SHIFT}; the output would be 0, lower the shift in the lowering")
        if layer.kind in ("upsample", "concat", "split", "shuffle"):
            lo, hi = t(layer.outputs[0]).range
            for name in layer.inputs:
                if t(name).range[0] < lo or t(name).range[1] > hi or t(name).bits >= 32:
                    raise UserError(f"{where}: input {name} (range {t(name).range}) does not fit its output's range [{lo}, {hi}]; "
                                    "tensors joined without arithmetic must share one 8-bit type")
        if layer.kind == "split" and t(layer.inputs[0]).shape[0] % 2:
            raise UserError(f"{where}: split needs an even channel count")
        if layer.kind == "shuffle" and (layer.groups < 1 or t(layer.inputs[0]).shape[0] % layer.groups):
            raise UserError(f"{where}: shuffle groups must divide the channels")
    for name, tensor in graph.tensors.items():
        if tensor.bits > 8 and tensor.bits != 32:
            raise UserError(f"IR tensor {name} has {tensor.bits} bits; the engine streams 8-bit (or smaller) activations and 32-bit head outputs")


def _is_pw(layer: Layer | None, graph: Graph) -> bool:
    return (layer is not None and layer.kind == "conv" and layer.kernel == 1 and layer.stride == 1
            and layer.groups == 1 and layer.requant)


def _is_dw3(layer: Layer, graph: Graph) -> bool:
    cin = graph.tensor(layer.inputs[0]).shape[0]
    return layer.kind == "conv" and layer.kernel == 3 and layer.groups == cin and cin > 1


def _units(graph: Graph) -> list[tuple[str, list[Layer]]]:
    """Group the layers into process kinds: engines absorb their 1x1 and offset convs."""
    producer = {o: layer for layer in graph.layers for o in layer.outputs}
    readers: dict[str, list[Layer]] = defaultdict(list)
    for layer in graph.layers:
        for name in layer.inputs:
            readers[name].append(layer)
    outputs = set(graph.outputs)

    def only_read_by(tensor: str, layers: list[Layer]) -> bool:
        return tensor not in outputs and {id(r) for r in readers[tensor]} == {id(x) for x in layers}

    engines: dict[int, tuple[str, list[Layer]]] = {}  # id(last layer) -> unit
    absorbed: set[int] = set()
    for layer in graph.layers:
        if layer.kind == "deform_dw":
            x, dil = layer.inputs
            off = producer.get(dil)
            if not (off is not None and off.kind == "conv" and off.kernel == 3 and off.stride == 1 and off.groups == 1
                    and off.inputs == [x] and off.requant and only_read_by(dil, [layer])):
                raise UserError(
                    f"IR layer {layer.name}: its dilation {dil!r} must come from a 3x3 offset conv on the same input {x!r} "
                    "read by nothing else; the fused CoDeNet engine computes both from one line buffer"
                )
            pw = producer.get(x)
            if _is_pw(pw, graph) and only_read_by(x, [off, layer]):
                engines[id(layer)] = ("engine_pw_deform", [pw, off, layer])
                absorbed.update({id(pw), id(off)})
            else:
                engines[id(layer)] = ("engine_deform", [off, layer])
                absorbed.add(id(off))
        elif _is_dw3(layer, graph) and layer.stride == 1:
            pw = producer.get(layer.inputs[0])
            if _is_pw(pw, graph) and only_read_by(layer.inputs[0], [layer]) and id(pw) not in absorbed:
                engines[id(layer)] = ("engine_pw_dw", [pw, layer])
                absorbed.add(id(pw))
    units: list[tuple[str, list[Layer]]] = []
    for layer in graph.layers:
        if id(layer) in absorbed:
            continue
        if id(layer) in engines:
            units.append(engines[id(layer)])
        elif layer.kind == "conv":
            kind = "conv_1x1" if layer.kernel == 1 else ("dw_3x3" if _is_dw3(layer, graph) else "conv_3x3")
            units.append((kind, [layer]))
        elif layer.kind in ROUTING:
            units.append(("route", [layer]))
        else:
            units.append((layer.kind, [layer]))
    position = {id(layer): k for k, layer in enumerate(graph.layers)}
    return _order(_merge_routes(units, position))


def _unit_edges(units: list[tuple[str, list[Layer]]]) -> dict[int, set[int]]:
    """Unit index -> indices of the units that read one of its tensors."""
    producer = {o: k for k, (_, layers) in enumerate(units) for layer in layers for o in layer.outputs}
    succ: dict[int, set[int]] = defaultdict(set)
    for k, (_, layers) in enumerate(units):
        for layer in layers:
            for name in layer.inputs:
                if name in producer and producer[name] != k:
                    succ[producer[name]].add(k)
    return succ


def _merge_routes(units: list[tuple[str, list[Layer]]], position: dict[int, int]) -> list[tuple[str, list[Layer]]]:
    """Join each routing unit with the routing units it reads, unless that closes a cycle.

    Merging producer v into reader u is safe iff u cannot be reached from v
    through some other unit: then the merged process never waits for its own output.
    """
    units = [(kind, list(layers)) for kind, layers in units]
    changed = True
    while changed:
        changed = False
        succ = _unit_edges(units)
        producer = {o: k for k, (_, layers) in enumerate(units) for layer in layers for o in layer.outputs}
        for u, (kind, layers) in enumerate(units):
            if kind != "route":
                continue
            for v in sorted({producer[n] for layer in layers for n in layer.inputs if n in producer} - {u}):
                if units[v][0] != "route" or _reaches_avoiding(succ, v, u):
                    continue
                merged = sorted(units[v][1] + layers, key=lambda layer: position[id(layer)])
                units[u] = ("route", merged)
                del units[v]
                changed = True
                break
            if changed:
                break
    return units


def _reaches_avoiding(succ: dict[int, set[int]], src: int, dst: int) -> bool:
    """Whether dst is reachable from src by a path of at least two edges."""
    stack = [k for k in succ.get(src, ()) if k != dst]
    seen = set(stack)
    while stack:
        k = stack.pop()
        if k == dst:
            return True
        for n in succ.get(k, ()):
            if n not in seen:
                seen.add(n)
                stack.append(n)
    return False


def _order(units: list[tuple[str, list[Layer]]]) -> list[tuple[str, list[Layer]]]:
    """Topological order of the units, as close to the graph's order as the merged routes allow."""
    succ = _unit_edges(units)
    indegree = [0] * len(units)
    for targets in succ.values():
        for k in targets:
            indegree[k] += 1
    ready = [k for k in range(len(units)) if indegree[k] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(units[k])
        for n in succ.get(k, ()):
            indegree[n] -= 1
            if indegree[n] == 0:
                heapq.heappush(ready, n)
    return order


def _stage(layer: Layer, role: str, graph: Graph) -> Stage:
    cin, h, w = graph.tensor(layer.inputs[0]).shape
    cout, ho, wo = graph.tensor(layer.outputs[0]).shape
    return Stage(layer, role, cin, cout, layer.kernel if layer.kind == "conv" else 3, h, w, ho, wo)


def build_plan(graph: Graph) -> Plan:
    """The process network for ``graph`` with one lane per stage (see estimate for the real lanes)."""
    _check_layers(graph)
    ids = _Ids()
    tensors = dict(graph.tensors)
    procs: list[Process] = [Process(ids("read_input"), "read_input", out_tensors=[graph.input])]

    readers: dict[str, list[Layer]] = defaultdict(list)
    for layer in graph.layers:
        for name in layer.inputs:
            readers[name].append(layer)
    for kind, layers in _units(graph):
        last = layers[-1]
        if kind == "route":
            procs.append(_route(ids(last.name), layers, graph, readers))
            continue
        proc_kind = {"upsample": "upsample_2x"}.get(kind, kind)
        proc = Process(ids(last.name), proc_kind, list(layers), in_tensors=[layers[0].inputs[0]] if kind.startswith("engine") else list(last.inputs),
                       out_tensors=list(last.outputs))
        if kind == "engine_pw_deform":
            proc.stages = [_stage(layers[0], "conv", graph), _stage(layers[1], "offset", graph), _stage(layers[2], "dw", graph)]
        elif kind == "engine_deform":
            proc.stages = [_stage(layers[0], "offset", graph), _stage(layers[1], "dw", graph)]
        elif kind == "engine_pw_dw":
            proc.stages = [_stage(layers[0], "conv", graph), _stage(layers[1], "dw", graph)]
        elif kind in ("conv_1x1", "conv_3x3"):
            proc.stages = [_stage(last, "conv", graph)]
        elif kind == "dw_3x3":
            proc.stages = [_stage(last, "dw", graph)]
        if kind in ("engine_pw_deform", "engine_deform"):
            proc.lag = max(1, last.bound)
        elif kind in ("engine_pw_dw", "conv_3x3", "dw_3x3"):
            proc.lag = 1
        proc.rows = 2 * proc.lag + 1 if proc.lag else 0
        procs.append(proc)

    procs = _connect(graph, procs, tensors, ids)
    streams = {s.name: s for s in _streams(procs)}
    plan = Plan(graph, tensors, procs, streams, ids.map)
    _set_depths(plan)
    return plan


def _route(name: str, layers: list[Layer], graph: Graph, readers: dict[str, list[Layer]]) -> Process:
    """One process for a chain of routing layers, with the channel map computed symbolically."""
    members = {id(layer) for layer in layers}
    written = {o for layer in layers for o in layer.outputs}
    in_tensors: list[str] = []
    for layer in layers:
        for t in layer.inputs:
            if t not in written and t not in in_tensors:
                in_tensors.append(t)
    # every tensor of the chain as an array of (input slot, channel) pairs, following the reference's rules
    env: dict[str, np.ndarray] = {}
    for slot, t in enumerate(in_tensors):
        c = graph.tensor(t).shape[0]
        env[t] = np.stack([np.full(c, slot), np.arange(c)], axis=1)
    for layer in layers:
        ins = [env[t] for t in layer.inputs]
        if layer.kind == "concat":
            outs = [np.concatenate(ins, axis=0)]
        elif layer.kind == "split":
            half = ins[0].shape[0] // 2
            outs = [ins[0][:half], ins[0][half:]]
        else:  # shuffle: output channel k reads input channel (k % G) * (C / G) + k // G
            k = np.arange(ins[0].shape[0])
            outs = [ins[0][(k % layer.groups) * (k.size // layer.groups) + k // layer.groups]]
        env.update(zip(layer.outputs, outs))
    out_tensors = [o for layer in layers for o in layer.outputs
                   if o in graph.outputs or any(id(r) not in members for r in readers[o])]
    routes = [[(int(a), int(b)) for a, b in env[o]] for o in out_tensors]
    return Process(name, "route", list(layers), in_tensors=in_tensors, out_tensors=out_tensors, routes=routes)


def _connect(graph: Graph, procs: list[Process], tensors: dict[str, Tensor], ids: _Ids) -> list[Process]:
    """Name the streams; insert forks (tensors read twice), drains and the output writers."""
    readers: dict[str, list[tuple[Process, int]]] = defaultdict(list)
    for p in procs:
        p.inputs = [""] * len(p.in_tensors)
        for slot, name in enumerate(p.in_tensors):
            readers[name].append((p, slot))
    writers = []
    for name in graph.outputs:
        w = Process(ids(f"write_{name}"), "write_output", in_tensors=[name], inputs=[""])
        readers[name].append((w, 0))
        writers.append(w)

    ordered: list[Process] = []
    for p in procs:
        ordered.append(p)
        p.outputs = []
        for name in p.out_tensors:
            ends = readers.get(name, [])
            base = ids(name, "s_")
            if not ends:
                p.outputs.append(base)
                ordered.append(Process(ids(f"drain_{name}"), "drain", inputs=[base], in_tensors=[name]))
                continue
            if len(ends) == 1:
                p.outputs.append(base)
                ends[0][0].inputs[ends[0][1]] = base
                continue
            p.outputs.append(base)
            src = base
            for k, (reader, slot) in enumerate(ends[:-1]):  # fork chain: branch k goes to reader k
                branch = ids(f"{name}_{k}", "s_")
                rest = ids(f"{name}_f{k}", "s_") if k < len(ends) - 2 else ids(f"{name}_{k + 1}", "s_")
                ordered.append(Process(ids(f"fork_{name}_{k}"), "fork_2", inputs=[src], in_tensors=[name],
                                       outputs=[branch, rest], out_tensors=[name, name]))
                reader.inputs[slot] = branch
                src = rest
            last_reader, last_slot = ends[-1]
            last_reader.inputs[last_slot] = src
    return ordered + writers


def _streams(procs: list[Process]) -> list[Stream]:
    producer: dict[str, tuple[Process, str]] = {}
    for p in procs:
        for name, tensor in zip(p.outputs, p.out_tensors):
            producer[name] = (p, tensor)
    out = []
    for p in procs:
        for name in p.inputs:
            src, tensor = producer[name]
            out.append(Stream(name, tensor, src.name, p.name))
    return out


def _set_depths(plan: Plan) -> None:
    """Deepen each stream into a join (a route with several inputs) so that the dataflow cannot deadlock.

    For every stream, ``ready[q]`` is the index of the image pixel after whose
    arrival pixel q of the stream can be sent, counting only data dependencies
    (a window of lag L and stride s sends output (yo, xo) once input pixel
    (s*yo + L, s*xo + L), clipped to the image, is in; upsampling sends the
    second copy of a row at the end of the source row). A join takes pixel q
    of all its inputs at ``max_k ready_k[q]``; the pixels of input k that were
    ready strictly before that and are not yet taken must fit in its FIFO
    (two more cover the pipeline). Slower processes
    only throttle the flow; they cannot deadlock it once these fit.
    """
    ready: dict[str, np.ndarray] = {}
    for p in plan.processes:
        ins = [ready[s] for s in p.inputs]
        if p.kind == "read_input":
            _, h, w = plan.tensors[p.out_tensors[0]].shape
            out = np.arange(h * w)
        elif p.kind == "upsample_2x":
            _, h, w = plan.tensors[p.in_tensors[0]].shape
            src = ins[0].reshape(h, w)
            first = np.repeat(src, 2, axis=1)
            second = np.repeat(src[:, -1:], 2 * w, axis=1)
            out = np.stack([first, second], axis=1).reshape(-1)
        elif p.stages:
            stage = p.stages[-1]
            stride = stage.layer.stride if stage.layer.kind == "conv" else 1
            yo, xo = np.meshgrid(np.arange(stage.ho), np.arange(stage.wo), indexing="ij")
            y, x = stride * yo + p.lag, stride * xo + p.lag
            last_read = np.where(y < stage.h, y * stage.w + np.minimum(x, stage.w - 1), stage.h * stage.w - 1)
            out = np.maximum.accumulate(ins[0][last_read.reshape(-1)])
        elif len(ins) > 1:
            out = np.maximum.reduce(ins)
            taken = np.arange(out.size)
            for name, arrived in zip(p.inputs, ins):
                waiting = np.searchsorted(arrived, out, side="left") - taken  # ready strictly earlier, not taken yet
                plan.streams[name].depth = FIFO_DEPTH + int(max(0, waiting.max()))
        else:
            out = ins[0]
        for name in p.outputs:
            ready[name] = out
