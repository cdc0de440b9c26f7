"""Resources, cycles and FPS of the generated HLS design, from an analytical model.

The model prices the process network of ``fpga/dataflow.py`` - the same plan
and lanes ``fpga/hls.py`` writes as C++ - on a board preset. It is a
first-order model of that code, not of Vitis HLS's scheduler: no Vitis run
calibrated it, so treat it as a sizing guide (csynth's report is the truth).

Notation per stage (one IR conv inside a process): ``po`` output channels x
``pi`` input channels per cycle (depthwise: ``po`` channels, ``pi = 1``); a 3x3
stage also reads its 3 kernel rows per cycle, so its lanes (MACs per cycle) are
``po*pi*3`` (1x1: ``po*pi``). ``trips = MACs per output pixel / lanes`` is its
pipelined loop's length. ``LOOP`` = 6 cycles of fill and drain each time a
pipelined inner loop is entered (the loops sit inside the per-pixel loop).

Cycles per image of each process (H x W input grid, HO x WO output grid):

- ``conv_1x1``: ``H*W + HO*WO*(trips + LOOP)``
- windowed processes (``conv_3x3``, ``dw_3x3``, the engines) step over
  ``(H+L)*(W+L)`` positions (L = 1 for a 3x3, L = max(N, 1) for a deformable
  window of bound N) at one cycle each, plus per input pixel
  ``store + LOOP`` (store = C / store lanes, into the line buffer; the engines
  with a 1x1 stage first add ``pw.trips + LOOP``) and per output pixel
  ``trips + LOOP`` for the 3x3 stage (deformable: the offset conv and the taps,
  each ``3*C/po + LOOP``);
- ``upsample_2x``: ``2*H*(2*W + LOOP)`` (two writes per cycle pair);
- ``route`` (a chain of concat / split / shuffle layers), ``fork_2``,
  ``drain``: ``H*W + LOOP`` (one pixel of every stream per cycle);
- ``read_input`` / ``write_output``: ``C*H*W + LOOP`` (one m_axi beat per value).

Throughput: the dataflow overlaps the processes (and consecutive images), so
the interval between images is the slowest process's cycles and
``FPS = clock / interval``. Latency: a process starts once each producer
has emitted its first pixel (``first`` = the look-ahead of its window plus one
output pixel) and ends no earlier than its own cycles after starting nor than
its last producer's end plus its own ``first``; the latency is the last
writer's end.

Resources:

- DSP: one DSP48 per MAC lane (the C++ binds each 4-bit x 8-bit product to a
  DSP with ``BIND_OP impl=dsp``; packing two products per DSP or mapping them
  to LUTs is not done), plus 2 per requantization lane (a 32 x 15-bit
  product needs two 27 x 18 multipliers); requantization lanes are ``po`` per
  requantized stage, 1 for an offset conv.
- BRAM_18K: each memory after the code's ARRAY_RESHAPE is ``depth x width``
  bits and takes ``min over the RAMB18 shapes (16Kx1 .. 512x36) of
  ceil(width/w) * ceil(depth/d)``; memories of at most 1 Kbit or 16 words are
  LUTRAM (``ceil(depth/64) * width`` LUTs) instead. Memories: weight ROMs
  (4-bit; width ``lanes*4``, depth ``trips``), bias / multiplier / shift ROMs
  (width ``po`` x 32 / 15 / 6), line buffers (``ROWS`` memories of width
  ``lanes*8``, depth ``W*C/lanes``), the upsampler's row (``W`` x ``C*8``),
  and stream FIFOs (``depth x C*bits``: depth 2 in flip-flops, ``2*width`` FF
  and ``width/2`` LUTs of read mux, as Vivado builds shift registers shorter
  than 3; SRLs, ``width*ceil(depth/32)`` LUTs, up to depth 32). Each m_axi bundle adds 2 BRAM for its burst buffer.
- LUT / FF: per MAC lane 12 / 24 (adder tree, pipeline registers); per
  requantization lane 150 / 120 (48-bit round, variable shift, clamp); per
  process 150 / 200 of control; the line buffer's row and the 1x1 stage's
  channel selection as LUT-6 multiplexers (``bits * ceil((n-1)/3)`` LUTs for
  n inputs); vector registers as FFs; each m_axi bundle 1,200 / 1,600 (the image has
  one, the outputs share one; each further output port on it 300 / 400) and the
  s_axilite control 300 / 400. A ``route`` has no logic besides its control:
  its channel map is wiring, so it costs its input registers (sum over its k
  input streams of ``C*bits``) and its output registers (the same over its m
  output streams) in FF, plus the FIFOs of those streams; the tensors inside
  the chain have no stream, register or FIFO. A ``fork_2`` costs its input
  register and its two output FIFOs.

Parallelism: unless given, lanes are chosen greedily: start every stage at
one lane, then repeatedly give the slowest process's most profitable stage its
next lane count (divisors of its channel counts) while the design stays within
the board's DSP and BRAM and 80% of its LUT and FF; stop when no such step
saves 1% of the slowest process's cycles. A design that does not fit even so raises a
:class:`UserError` naming the resource.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from edgekit.fpga.boards import BOARDS, Board, get_board
from edgekit.fpga.dataflow import Plan, Process, Stage, build_plan
from edgekit.fpga.ir import Graph

from edgekit.errors import UserError

LOOP = 6
MAC_LUT, MAC_FF = 12, 24
RQ_DSP, RQ_LUT, RQ_FF = 2, 150, 120
CTRL_LUT, CTRL_FF = 150, 200
AXI_LUT, AXI_FF, AXI_BRAM = 1_200, 1_600, 2
AXI_SHARED_LUT, AXI_SHARED_FF = 300, 400  # another port on an existing m_axi bundle
LITE_LUT, LITE_FF = 300, 400
LUTRAM_MAX_BITS, LUTRAM_MAX_DEPTH = 1024, 16
SRL_MAX_DEPTH = 32
BRAM18_SHAPES = ((16384, 1), (8192, 2), (4096, 4), (2048, 9), (1024, 18), (512, 36))
AUTO_LUT_FF_SHARE = 0.8  # the greedy leaves room for routing and the AXI interconnect
MIN_GAIN = 0.01  # an extra lane must save 1% of the slowest process's cycles (loop overheads make later lanes worthless)
RESOURCES = ("dsp", "bram_18k", "lut", "ff")


@dataclass
class Cost:
    dsp: int = 0
    bram_18k: int = 0
    lut: int = 0
    ff: int = 0

    def add(self, other: Cost) -> None:
        self.dsp += other.dsp
        self.bram_18k += other.bram_18k
        self.lut += other.lut
        self.ff += other.ff


def memory(depth: int, width: int) -> Cost:
    """BRAM_18K (or LUTRAM) for a depth x width memory."""
    if depth <= 0 or width <= 0:
        return Cost()
    if depth * width <= LUTRAM_MAX_BITS or depth <= LUTRAM_MAX_DEPTH:
        return Cost(lut=math.ceil(depth / 64) * width)
    return Cost(bram_18k=min(math.ceil(width / w) * math.ceil(depth / d) for d, w in BRAM18_SHAPES))


def fifo(depth: int, width: int) -> Cost:
    if depth <= 2:  # Vivado builds shift registers shorter than 3 (-shreg_min_size) from flip-flops
        return Cost(lut=math.ceil(width / 2), ff=depth * width)
    if depth <= SRL_MAX_DEPTH:
        return Cost(lut=width * math.ceil(depth / 32), ff=width)
    c = memory(depth, width)
    c.lut += 60
    return c


def mux_luts(inputs: int, bits: int) -> int:
    return bits * math.ceil((inputs - 1) / 3) if inputs > 1 else 0


@dataclass
class LayerRow:
    """One dataflow process: what the benchmark table lists."""

    name: str
    kind: str
    layers: list[str]
    macs: int
    lanes: int  # MACs per cycle
    cycles: int
    dsp: int
    bram_18k: int
    lut: int
    ff: int
    first: int = 0  # cycles to its first output pixel


@dataclass
class Estimate:
    board: Board
    clock_mhz: float
    rows: list[LayerRow]
    totals: dict[str, int]
    interval_cycles: int
    latency_cycles: int
    bottleneck: str
    parallelism: dict[str, int]  # IR layer -> MACs per cycle
    plan: Plan = field(repr=False, compare=False, default=None)  # type: ignore[assignment]

    @property
    def fps(self) -> float:
        return self.clock_mhz * 1e6 / self.interval_cycles

    @property
    def latency_ms(self) -> float:
        return self.latency_cycles / (self.clock_mhz * 1e3)

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.rows)

    @property
    def available(self) -> dict[str, int]:
        return {"dsp": self.board.dsp, "bram_18k": self.board.bram_18k, "lut": self.board.lut, "ff": self.board.ff}

    @property
    def utilization(self) -> dict[str, float]:
        return {k: self.totals[k] / v for k, v in self.available.items()}

    @property
    def overflows(self) -> list[str]:
        """Resources the design needs more of than the board has."""
        return [k for k in RESOURCES if self.totals[k] > self.available[k]]

    @property
    def fits(self) -> bool:
        return not self.overflows

    def summary(self) -> dict:
        return {
            "board": self.board.name,
            "part": self.board.part,
            "clock_mhz": self.clock_mhz,
            "fps": round(self.fps, 2),
            "latency_ms": round(self.latency_ms, 3),
            "interval_cycles": self.interval_cycles,
            "latency_cycles": self.latency_cycles,
            "bottleneck": self.bottleneck,
            "fits": self.fits,
            "macs": self.macs,
            **{k: self.totals[k] for k in RESOURCES},
            "available": self.available,
            "utilization": {k: round(v, 4) for k, v in self.utilization.items()},
        }

    def to_dict(self) -> dict:
        return {**self.summary(), "parallelism": dict(self.parallelism), "rows": [asdict(r) for r in self.rows]}

    def table(self) -> str:
        """Markdown table: one row per process, then the totals."""
        lines = ["| process | kind | IR layers | MACs | MACs/cycle | cycles | DSP | BRAM_18K | LUT | FF |",
                 "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in self.rows:
            lines.append(f"| {r.name} | {r.kind} | {', '.join(r.layers) or '-'} | {r.macs:,} | {r.lanes} | {r.cycles:,} | "
                         f"{r.dsp} | {r.bram_18k} | {r.lut:,} | {r.ff:,} |")
        t = self.totals
        lines.append(f"| **total** | | | {self.macs:,} | | {self.interval_cycles:,} (interval) | {t['dsp']} | "
                     f"{t['bram_18k']} | {t['lut']:,} | {t['ff']:,} |")
        a = self.available
        lines.append(f"| {self.board.name} | | | | | | {a['dsp']} | {a['bram_18k']} | {a['lut']:,} | {a['ff']:,} |")
        lines.append("")
        lines.append(f"{self.fps:.1f} FPS at {self.clock_mhz:g} MHz (interval {self.interval_cycles:,} cycles, "
                     f"bottleneck {self.bottleneck}); latency {self.latency_ms:.2f} ms.")
        return "\n".join(lines)


# ------------------------------------------------------------------ model


def _bits(plan: Plan, tensor: str) -> int:
    t = plan.tensors[tensor]
    return min(32, t.bits)


def _width(plan: Plan, tensor: str) -> int:
    return plan.tensors[tensor].shape[0] * _bits(plan, tensor)


def _grid(plan: Plan, tensor: str) -> tuple[int, int, int]:
    return plan.tensors[tensor].shape


def _store_lanes(p: Process) -> int:
    """Channels per cycle written into (and read from) the line buffer."""
    last = p.stages[-1]
    return last.pi if p.kind == "conv_3x3" else last.po


def _stage_cost(stage: Stage, in_bits: int) -> Cost:
    rq = (1 if stage.role == "offset" else stage.po) if stage.requant else 0
    c = Cost(dsp=stage.lanes + RQ_DSP * rq, lut=MAC_LUT * stage.lanes + RQ_LUT * rq, ff=MAC_FF * stage.lanes + RQ_FF * rq)
    words = stage.po * stage.pi * stage.rows_per_cycle
    c.add(memory(stage.trips, words * 4))  # weights, reshaped to one word per cycle
    c.add(memory(stage.cout // stage.po, stage.po * 32))  # bias
    if stage.requant:
        c.add(memory(stage.cout // stage.po, stage.po * (15 + 6)))  # multiplier and shift
    if stage.kernel == 1:  # the 1x1 stage picks pi of cin channels from the pixel vector
        c.lut += mux_luts(stage.cin // stage.pi, stage.pi * in_bits)
    return c


def _process(plan: Plan, p: Process) -> tuple[int, int, Cost]:
    """(cycles, first, cost) of one process."""
    cost = Cost(lut=CTRL_LUT, ff=CTRL_FF)
    for t in p.in_tensors:
        cost.ff += _width(plan, t)  # input vector register
    if p.kind == "read_input":
        c, h, w = _grid(plan, p.out_tensors[0])
        cost.add(Cost(bram_18k=AXI_BRAM, lut=AXI_LUT, ff=AXI_FF + _width(plan, p.out_tensors[0])))
        return c * h * w + LOOP, c + LOOP, cost
    if p.kind == "write_output":
        c, h, w = _grid(plan, p.in_tensors[0])
        first_writer = next(q for q in plan.processes if q.kind == "write_output") is p
        # the outputs share one m_axi bundle: its adapter is paid once, the other ports add address/burst logic
        cost.add(Cost(bram_18k=AXI_BRAM, lut=AXI_LUT, ff=AXI_FF) if first_writer else Cost(lut=AXI_SHARED_LUT, ff=AXI_SHARED_FF))
        return c * h * w + LOOP, c + LOOP, cost
    if p.kind == "upsample_2x":
        c, h, w = _grid(plan, p.in_tensors[0])
        cost.add(memory(w, _width(plan, p.in_tensors[0])))
        return 2 * h * (2 * w + LOOP), 2 + LOOP, cost
    if not p.stages:  # route, fork, drain: one pixel per cycle
        _, h, w = _grid(plan, p.in_tensors[0])
        if p.kind == "route":  # pure wiring: the channel map costs no logic, only the output registers
            cost.ff += sum(_width(plan, t) for t in p.out_tensors)
        return h * w + LOOP, 1 + LOOP, cost

    for stage in p.stages:
        cost.add(_stage_cost(stage, _bits(plan, stage.layer.inputs[0])))
    out = p.stages[-1]
    cost.ff += _width(plan, p.out_tensors[0])  # output vector register
    if p.kind == "conv_1x1":
        per_out = out.trips + LOOP
        return out.h * out.w + out.ho * out.wo * per_out, per_out + 1, cost

    lanes = _store_lanes(p)
    lb_tensor = out.layer.inputs[0]
    lb_bits, (channels, h, w) = _bits(plan, lb_tensor), _grid(plan, lb_tensor)
    for _ in range(p.rows):
        cost.add(memory(w * channels // lanes, lanes * lb_bits))
    readers = 2 if p.stage("offset") else 1  # the offset conv and the taps both read the window
    cost.lut += readers * 3 * mux_luts(p.rows, lanes * lb_bits)
    per_in = channels // lanes + LOOP
    if p.pw is not None:
        per_in += p.pw.trips + LOOP
        cost.ff += channels * lb_bits  # the 1x1 stage's output register
    per_out = sum(s.trips + LOOP for s in p.stages if s.kernel == 3)
    lag = p.lag
    steps = (h + lag) * (w + lag)
    cycles = steps + h * w * per_in + out.ho * out.wo * per_out
    first = (lag * (w + lag) + lag + 1) * (1 + per_in) + per_out
    return cycles, first, cost


def _evaluate(plan: Plan) -> tuple[list[LayerRow], dict[str, int], int]:
    rows = []
    totals = Cost(lut=LITE_LUT, ff=LITE_FF)
    for p in plan.processes:
        cycles, first, cost = _process(plan, p)
        macs = sum(s.macs for s in p.stages)
        lanes = sum(s.lanes for s in p.stages)
        rows.append(LayerRow(p.name, p.kind, [layer.name for layer in p.layers], macs, lanes, cycles,
                             cost.dsp, cost.bram_18k, cost.lut, cost.ff, first))
        totals.add(cost)
    for s in plan.streams.values():
        c = fifo(s.depth, _width(plan, s.tensor))
        totals.add(c)
        reader = next(r for r in rows if r.name == s.consumer)  # a FIFO is charged to its reader
        reader.bram_18k += c.bram_18k
        reader.lut += c.lut
        reader.ff += c.ff
    latency = _latency(plan, {r.name: r for r in rows})
    return rows, asdict(totals), latency


def _latency(plan: Plan, rows: dict[str, LayerRow]) -> int:
    producer = {s.name: s.producer for s in plan.streams.values()}
    start: dict[str, int] = {}
    end: dict[str, int] = {}
    for p in plan.processes:
        r = rows[p.name]
        preds = [producer[s] for s in p.inputs]
        start[p.name] = max((start[q] + rows[q].first for q in preds), default=0)
        end[p.name] = max([start[p.name] + r.cycles] + [end[q] + r.first for q in preds])
    return max(end.values())


# ------------------------------------------------------------------ lanes


def _tunable(plan: Plan) -> list[Stage]:
    return [s for s in plan.stages() if s.role != "offset"]


def _choose(stage: Stage, macs_per_cycle: int) -> tuple[int, int]:
    """The largest option with at most ``macs_per_cycle`` lanes (at least the smallest)."""
    options = stage.options()
    fitting = [o for o in options if o[0] * o[1] * stage.rows_per_cycle <= macs_per_cycle]
    return fitting[-1] if fitting else options[0]


def _over(totals: dict[str, int], board: Board, share: float) -> str | None:
    limits = {"dsp": board.dsp, "bram_18k": board.bram_18k, "lut": board.lut * share, "ff": board.ff * share}
    return next((k for k in RESOURCES if totals[k] > limits[k]), None)


def _balance(plan: Plan, board: Board, fixed: set[int]) -> None:
    """Greedy: speed up the slowest process while the board has room (see the module docstring)."""
    while True:
        rows, _, _ = _evaluate(plan)
        slow = max(rows, key=lambda r: r.cycles)
        proc = next(p for p in plan.processes if p.name == slow.name)
        trials = []
        for stage in proc.stages:
            if id(stage) in fixed or stage.role == "offset":
                continue
            options = stage.options()
            k = options.index((stage.po, stage.pi))
            if k + 1 < len(options):
                trials.append((stage, options[k + 1]))
        scored = []
        for stage, option in trials:
            old = (stage.po, stage.pi)
            plan.set_lanes(stage, *option)
            scored.append((_process(plan, proc)[0], stage, option))
            plan.set_lanes(stage, *old)
        grown = False
        for cycles, stage, option in sorted(scored, key=lambda t: t[0]):
            if cycles > slow.cycles * (1 - MIN_GAIN):
                break
            old = (stage.po, stage.pi)
            plan.set_lanes(stage, *option)
            if _over(_evaluate(plan)[1], board, AUTO_LUT_FF_SHARE) is None:
                grown = True
                break
            plan.set_lanes(stage, *old)
        if not grown:
            return


def _assign_lanes(plan: Plan, board: Board, parallelism: dict[str, int] | int | None) -> None:
    fixed: set[int] = set()
    if isinstance(parallelism, int):
        if parallelism < 1:
            raise UserError(f"parallelism must be at least 1 MAC per cycle, not {parallelism}")
        for stage in _tunable(plan):
            plan.set_lanes(stage, *_choose(stage, parallelism))
        return
    for name, value in (parallelism or {}).items():
        stage = plan.stage_of(name)
        if stage is None or stage.role == "offset":
            valid = ", ".join(s.layer.name for s in _tunable(plan))
            raise UserError(f"parallelism names {name!r}, which is not a conv of the graph (an engine's offset conv follows its deform_dw); valid: {valid}")
        if int(value) < 1:
            raise UserError(f"parallelism for {name} must be at least 1 MAC per cycle, not {value}")
        plan.set_lanes(stage, *_choose(stage, int(value)))
        fixed.add(id(stage))
    _balance(plan, board, fixed)


def _too_big(resource: str, need: int, board: Board) -> UserError:
    label = {"dsp": "DSP", "bram_18k": "BRAM_18K", "lut": "LUT", "ff": "FF"}[resource]
    have = getattr(board, resource)
    bigger = sorted((b for b in BOARDS.values() if getattr(b, resource) >= need), key=lambda b: getattr(b, resource))
    board_fix = f"a bigger board ({bigger[0].name}: {getattr(bigger[0], resource):,} {label})" if bigger else "a bigger part than the presets"
    return UserError(
        f"the design needs {need:,} {label} but {board.name} ({board.part}) has {have:,}; "
        f"use a smaller input image or fewer channels, lower the parallelism, or {board_fix}"
    )


def estimate(graph: Graph, board: str | Board, clock_mhz: float | None = None,
             parallelism: dict[str, int] | int | None = None, *, check_fit: bool = True,
             plan: Plan | None = None) -> Estimate:
    """DSP, BRAM_18K, LUT, FF, cycles and FPS of the generated design on ``board``.

    ``parallelism``: MACs per cycle per IR conv layer (a dict), one figure for
    every layer (an int), or None to balance the pipeline within the board.
    Raises UserError when the design does not fit the board, unless
    ``check_fit=False`` (then see ``Estimate.fits`` / ``overflows``).
    """
    board = get_board(board)
    clock = float(clock_mhz or board.clock_mhz)
    if clock <= 0:
        raise UserError(f"clock_mhz must be positive, not {clock_mhz}")
    plan = plan or build_plan(graph)
    _assign_lanes(plan, board, parallelism)
    rows, totals, latency = _evaluate(plan)
    resource = _over(totals, board, 1.0)
    if resource is not None and check_fit:
        raise _too_big(resource, totals[resource], board)
    slow = max(rows, key=lambda r: r.cycles)
    lanes = {s.layer.name: s.lanes for s in plan.stages()}
    return Estimate(board, clock, rows, totals, slow.cycles, latency, slow.name, lanes, plan)
