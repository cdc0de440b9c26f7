"""The run report: ``report.json`` (everything, machine-readable), ``report.md``
(tables a person reads) and ``report.png`` (accuracy vs. latency, marker area by size).

Every number can be missing (a recipe without data has no accuracy, one without
a bench section no latency); missing values print as "–" and never fail the report.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from edgekit import fsio
from edgekit.errors import UserError

DASH = "–"
FORMATS = ("json", "md", "png")


def write_report(run_dir: Path, report: dict[str, Any], formats: list[str]) -> list[Path]:
    """Write the requested report files into ``run_dir`` atomically; return their paths."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise UserError(f"report.formats: {', '.join(unknown)} is not a report format; use any of {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    written: list[Path] = []
    if "json" in formats:
        fsio.write_json(run_dir / "report.json", report)
        written.append(run_dir / "report.json")
    if "md" in formats:
        fsio.write_text(run_dir / "report.md", render_markdown(report))
        written.append(run_dir / "report.md")
    if "png" in formats:
        from edgekit.report_quant import render_sensitivity_png

        render_png(report, run_dir / "report.png")
        written.append(run_dir / "report.png")
        if render_sensitivity_png(report.get("steps") or [], run_dir / "quantization.png"):
            written.append(run_dir / "quantization.png")
    return written


# -- numbers for people ------------------------------------------------------------

def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # excludes NaN


def human_bytes(n: Any) -> str:
    """1234567 -> "1.23 MB" (decimal units, like file managers and `ls -h --si`)."""
    if not _is_num(n):
        return DASH
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if unit != "KB" else f"{n / scale:.1f} KB"
    return f"{int(n)} B"


def human_count(n: Any) -> str:
    """22_713_000 -> "22.71 M" (params, MACs)."""
    if not _is_num(n):
        return DASH
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(int(n))


def _num(v: Any, fmt: str, suffix: str = "") -> str:
    return format(v, fmt) + suffix if _is_num(v) else DASH


def _rate(v: Any) -> str:
    return DASH if not _is_num(v) else f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


# Metrics shown as percentages; others are similarities or errors shown as is.
_PERCENT_METRICS = ("top1", "exact_match", "accuracy", "top1_agreement")


def format_metric(metric: str, value: Any) -> str:
    if not _is_num(value):
        return DASH
    if metric in _PERCENT_METRICS:
        return f"{value * 100:.2f} %"
    if metric == "cosine":
        return f"{value:.5f}"
    if metric == "perplexity":
        return f"{value:.3f}"
    return f"{value:.2e}"


def _metric_delta(metric: str, value: float, ref: float) -> str:
    d = value - ref
    if metric in _PERCENT_METRICS:
        return f"{d * 100:+.2f} pp"
    if metric == "cosine":
        return f"{d:+.5f}"
    if metric == "perplexity":
        return f"{d:+.3f}"
    return f"{d:+.2e}"


def headline_bench(metrics: dict[str, Any], runtime: str | None = None) -> dict[str, Any] | None:
    """The bench entry a summary shows: batch 1 with the fewest threads, else the first."""
    entries = [b for b in metrics.get("bench") or [] if runtime is None or b.get("runtime") == runtime]
    if not entries:
        return None
    batch1 = [b for b in entries if b.get("batch_size") == 1]
    return min(batch1, key=lambda b: b.get("threads") or 0) if batch1 else entries[0]


def _p50(bench: dict[str, Any] | None) -> float | None:
    v = ((bench or {}).get("latency_ms") or {}).get("p50")
    return v if _is_num(v) else None


def _source_step(steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((s for s in steps if s.get("kind") == "source"), steps[0] if steps else None)


def _cell(v: Any) -> str:
    text = DASH if v is None or v == "" else str(v)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]], right: set[int] = frozenset()) -> list[str]:
    align = ["---:" if i in right else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


# -- markdown ----------------------------------------------------------------------

def render_markdown(report: dict[str, Any]) -> str:
    steps = report.get("steps") or []
    lines = [f"# edgekit report: {report.get('name') or 'run'}", "", _context_line(report), ""]
    lines += _main_table(steps)
    lines += ["", "Accuracy is measured on the recipe's eval split; Δ columns compare each step with the source. "
              "Latency and throughput: batch 1 with the fewest threads benchmarked (every measurement is under Benchmarks)."]
    from edgekit.report_blockffn import render_blockffn_section
    from edgekit.report_decoding import render_decoding_section
    from edgekit.report_encdec import render_encdec_section
    from edgekit.report_fpga import render_fpga_section
    from edgekit.report_prune import render_prune_section
    from edgekit.report_quant import render_quant_section
    from edgekit.report_tokens import render_tokens_section

    lines += _group_section(steps)
    lines += render_prune_section(steps)
    lines += render_tokens_section(steps)
    lines += render_blockffn_section(steps)
    lines += render_encdec_section(steps)
    lines += render_decoding_section(steps)
    lines += render_fpga_section(steps)
    lines += render_quant_section(steps)
    lines += _bench_section(steps)
    lines += _parity_section(steps)
    lines += _setup_section(report)
    return "\n".join(lines) + "\n"


def _group_section(steps: list[dict[str, Any]]) -> list[str]:
    """Top-1 per sample group (e.g. localization vs other questions), when the eval data has groups."""
    rows = [(s.get("id", "?"), ((s.get("metrics") or {}).get("accuracy") or {}).get("by_group")) for s in steps]
    rows = [(i, g) for i, g in rows if g]
    if not rows:
        return []
    names = list(dict.fromkeys(n for _, g in rows for n in g))
    lines = ["", "## Accuracy by group", "", "| Step | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for step_id, groups in rows:
        lines.append(f"| {step_id} | " + " | ".join(_num(100 * groups[n], ".2f", " %") if n in groups else DASH for n in names) + " |")
    return lines


def _context_line(report: dict[str, Any]) -> str:
    m, v = report.get("machine") or {}, report.get("versions") or {}
    created = report.get("created") or ""
    try:
        created = datetime.fromisoformat(created).strftime("%Y-%m-%d %H:%M %Z").strip()
    except (TypeError, ValueError):
        pass
    cpu = f"{m.get('cpu') or 'unknown CPU'} ({m.get('cores') or '?'} cores)"
    libs = [f"{name} {v[name]}" for name in ("torch", "onnxruntime", "edgekit") if v.get(name)]
    return " · ".join(p for p in [cpu, *libs, created] if p)


def _main_table(steps: list[dict[str, Any]]) -> list[str]:
    src = _source_step(steps)
    src_met = (src or {}).get("metrics") or {}
    src_acc, src_size = src_met.get("accuracy") or {}, src_met.get("size_bytes")
    rows = []
    for s in steps:
        met = s.get("metrics") or {}
        acc = met.get("accuracy") or {}
        is_src = s is src
        acc_text = f"{acc.get('metric')} {format_metric(acc.get('metric'), acc.get('value'))}" if _is_num(acc.get("value")) else DASH
        if is_src:
            d_acc = d_size = "ref"
        else:
            same = _is_num(acc.get("value")) and _is_num(src_acc.get("value")) and acc.get("metric") == src_acc.get("metric")
            d_acc = _metric_delta(acc["metric"], acc["value"], src_acc["value"]) if same else DASH
            size = met.get("size_bytes")
            d_size = f"{size / src_size:.2f}×" if _is_num(size) and _is_num(src_size) and src_size > 0 else DASH
        b = headline_bench(met)
        bench_on = f"{b.get('runtime')}, {b.get('threads')} thr, batch {b.get('batch_size')}" if b else DASH
        rows.append([
            s.get("id", DASH) + (f" of {s['of']}" if s.get("of") else "") + (" (reused)" if s.get("cached") else ""),
            s.get("format"),
            acc_text,
            d_acc,
            human_bytes(met.get("size_bytes")),
            d_size,
            human_count(met.get("params")),
            human_count(met.get("macs")) + (" (partial)" if met.get("macs_partial") and _is_num(met.get("macs")) else ""),
            _num(_p50(b), ".3f"),
            _rate((b or {}).get("throughput_sps")),
            bench_on,
        ])
    header = ["Step", "Format", "Accuracy", "Δ accuracy", "Size", "Size vs source", "Params", "MACs",
              "p50 ms", "Throughput (samples/s)", "Measured on"]
    return _table(header, rows, right={2, 3, 4, 5, 6, 7, 8, 9})


def _bench_section(steps: list[dict[str, Any]]) -> list[str]:
    entries = [(s.get("id", DASH), b) for s in steps for b in (s.get("metrics") or {}).get("bench") or []]
    if not entries:
        return []
    devices: dict[str, dict[str, Any]] = {}
    rows = []
    for sid, b in entries:
        lat = b.get("latency_ms") or {}
        version = b.get("runtime_version")
        device = b.get("device") or {}
        where = device.get("url") or "local"
        devices.setdefault(where, device)
        rows.append([
            sid, f"{b.get('runtime')} {version}" if version else b.get("runtime"), where, b.get("threads"), b.get("batch_size"),
            _num(lat.get("p50"), ".3f"), _num(lat.get("p90"), ".3f"), _num(lat.get("p99"), ".3f"),
            _rate(b.get("throughput_sps")), _num(b.get("peak_rss_mb"), ".0f", " MB"),
        ])
    lines = ["", "## Benchmarks", ""]
    lines += _table(["Step", "Runtime", "Device", "Threads", "Batch", "p50 ms", "p90 ms", "p99 ms", "Throughput (samples/s)", "Peak RSS"],
                    rows, right={3, 4, 5, 6, 7, 8, 9})
    remote = {k: d for k, d in devices.items() if k != "local"}
    if remote:
        lines += ["", "Devices: local is the machine under Setup."]
        for url, d in remote.items():
            lines.append(
                f"- {url}: {d.get('cpu', DASH)}, {d.get('cores', '?')} cores, {d.get('machine', DASH)}; {d.get('os', DASH)}; "
                f"Python {d.get('python', DASH)}"
            )
    for sid, tvm in [(s.get("id", DASH), (s.get("metrics") or {}).get("tvm")) for s in steps]:
        if tvm:
            lines += ["", f"{sid}: {describe_tvm_build(tvm)}"]
    settings = {(b.get("warmup"), b.get("repeats"), b.get("isolated")) for _, b in entries}
    if len(settings) == 1:
        warmup, repeats, isolated = settings.pop()
        if warmup is not None and repeats is not None:
            where = "each model in its own process" if isolated else "in the pipeline's process"
            lines += ["", f"Latency of one call in ms: {warmup} warm-up calls, then {repeats} timed calls, {where}."]
    return lines


def describe_tvm_build(tvm: dict[str, Any]) -> str:
    """One sentence on how a TVM build was made: tuned or not, and what tuning cost."""
    if tvm.get("tuned"):
        reused = " (records reused from an earlier run)" if tvm.get("tuning_reused") else ""
        return f"TVM build tuned with MetaSchedule, {tvm.get('trials', '?')} trials in {_num(tvm.get('tuning_seconds'), '.0f', ' s')}{reused}."
    return "TVM build untuned (TVM's default CPU schedules)."


def _parity_section(steps: list[dict[str, Any]]) -> list[str]:
    checked = [(s.get("id", DASH), (s.get("metrics") or {}).get("verify")) for s in steps]
    checked = [(sid, v) for sid, v in checked if v]
    if not checked:
        return []
    rows = []
    for sid, v in checked:
        tol = f"atol {v['atol']:g}" if _is_num(v.get("atol")) else DASH
        if _is_num(v.get("rtol")):
            tol += f", rtol {v['rtol']:g}"
        passed = v.get("passed")
        rows.append([
            sid, v.get("runtime"), v.get("samples"),
            _num(v.get("max_abs"), ".2e"), _num(v.get("mean_abs"), ".2e"), _num(v.get("max_rel"), ".2e"),
            format_metric("top1_agreement", v.get("top1_agreement")), tol,
            DASH if passed is None else ("yes" if passed else "**no**"),
        ])
    lines = ["", "## Parity with the source", ""]
    lines += _table(["Step", "Runtime", "Samples", "Max abs", "Mean abs", "Max rel", "Top-1 agreement", "Tolerance", "Passed"],
                    rows, right={2, 3, 4, 5, 6})
    return lines


def _setup_section(report: dict[str, Any]) -> list[str]:
    m, v = report.get("machine") or {}, report.get("versions") or {}
    lines = ["", "## Setup", ""]
    if m:
        mem = f", {m['memory_gb']} GB RAM" if m.get("memory_gb") else ""
        flags = f", {' '.join(m['flags'])}" if m.get("flags") else ""
        lines.append(f"- Machine: {m.get('cpu', DASH)}, {m.get('cores', '?')} cores{flags}{mem}; {m.get('os', DASH)}; Python {m.get('python', DASH)}")
    if v:
        lines.append("- Versions: " + ", ".join(f"{k} {val or 'not installed'}" for k, val in v.items()))
    times = [f"{s.get('id')} {s['seconds']:.1f}s" for s in report.get("steps") or [] if _is_num(s.get("seconds"))]
    if times:
        lines.append("- Step times: " + ", ".join(times))
    lines.append("- Everything else (configs, per-pass metrics) is in report.json.")
    return lines


# -- plot --------------------------------------------------------------------------

_METRIC_LABELS = {
    "top1": "top-1 accuracy (eval split)",
    "cosine": "cosine similarity to the source (eval split)",
    "perplexity": "perplexity on the eval split (lower is better)",
    "max_abs": "max abs error vs. source (lower is better)",
    "mean_abs": "mean abs error vs. source (lower is better)",
}


def _fastest_batch1(metrics: dict[str, Any], runtime: str) -> dict[str, Any] | None:
    """The plot's entry for a runtime: batch 1 at its best thread count, else the headline entry."""
    entries = [b for b in metrics.get("bench") or [] if b.get("runtime") == runtime and b.get("batch_size") == 1 and _p50(b) is not None]
    if entries:
        return min(entries, key=_p50)
    b = headline_bench(metrics, runtime)
    return b if _p50(b) is not None else None


def _plot_points(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per (step, runtime) that has both an accuracy and a latency."""
    points = []
    for s in steps:
        met = s.get("metrics") or {}
        acc = met.get("accuracy") or {}
        if not _is_num(acc.get("value")):
            continue
        for rt in dict.fromkeys(b.get("runtime") for b in met.get("bench") or []):
            b = _fastest_batch1(met, rt)
            if b is not None:
                points.append({"id": s.get("id", "?"), "runtime": rt, "p50": _p50(b), "threads": b.get("threads"),
                               "acc": acc["value"], "metric": acc.get("metric"), "size": met.get("size_bytes")})
    return points


def render_png(report: dict[str, Any], path: Path) -> None:
    """Accuracy vs. p50 latency (marker area ∝ size) beside size per step; whatever exists otherwise."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = report.get("steps") or []
    points = _plot_points(steps)
    ids = [s.get("id", "?") for s in steps]
    mets = [s.get("metrics") or {} for s in steps]
    sizes = [m.get("size_bytes") if _is_num(m.get("size_bytes")) else 0 for m in mets]

    panels: list[tuple[str, Any]] = []
    if points:
        panels.append(("scatter", points))
    else:
        acc = [(i, m["accuracy"]) for i, m in zip(ids, mets) if _is_num((m.get("accuracy") or {}).get("value"))]
        if acc:
            metric = acc[0][1].get("metric")
            pct = (lambda v, _pos: f"{v * 100:.0f} %") if metric in _PERCENT_METRICS else None
            panels.append(("bars", ("accuracy", [i for i, _ in acc], [a["value"] for _, a in acc],
                                    _METRIC_LABELS.get(metric, metric), lambda v: format_metric(metric, v), pct)))
        lat = [(f"{i} · {b.get('runtime')} ({b.get('threads')} thr)", _p50(b)) for i, m in zip(ids, mets)
               for b in [_fastest_batch1(m, rt) for rt in dict.fromkeys(x.get("runtime") for x in m.get("bench") or [])]
               if b is not None]
        if lat:
            panels.append(("bars", ("p50 latency, batch 1, best thread count", [k for k, _ in lat], [v for _, v in lat], "ms", lambda v: f"{v:.3f} ms", None)))
    if any(sizes):
        unit, scale = next((u, f) for u, f in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("B", 1)) if max(sizes) >= f or u == "B")
        panels.append(("bars", ("size on disk", ids, [b / scale for b in sizes], unit, lambda v: human_bytes(v * scale), None)))

    widths = [1.7 if kind == "scatter" else 1.0 for kind, _ in panels] or [1.0]
    fig = Figure(figsize=(4.2 + 3.6 * sum(widths), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(f"edgekit · {report.get('name') or 'run'}", fontsize=13, fontweight="bold")
    if not panels:
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, "no accuracy, latency or size was recorded", ha="center", va="center", fontsize=12)
    else:
        axes = fig.subplots(1, len(panels), width_ratios=widths, squeeze=False)[0]
        for ax, (kind, data) in zip(axes, panels):
            if kind == "scatter":
                _draw_scatter(ax, data)
            else:
                _draw_bars(ax, *data)
    with fsio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def _draw_scatter(ax, points: list[dict[str, Any]]) -> None:
    metric = points[0]["metric"]
    points = [p for p in points if p["metric"] == metric]
    biggest = max((p["size"] for p in points if _is_num(p["size"])), default=0) or 1
    runtimes = list(dict.fromkeys(p["runtime"] for p in points))
    colors = {rt: f"C{i}" for i, rt in enumerate(runtimes)}
    for rt in runtimes:
        mine = [p for p in points if p["runtime"] == rt]
        ax.scatter([p["p50"] for p in mine], [p["acc"] for p in mine],
                   s=[max(25.0, 900.0 * (p["size"] or 0) / biggest) for p in mine],
                   color=colors[rt], alpha=0.55, edgecolors="black", linewidths=0.6, label=rt)
    # labels right of the points, alternately above and below, so neighbours stay readable
    for k, p in enumerate(sorted(points, key=lambda p: (p["p50"], p["acc"]))):
        ax.annotate(f"{p['id']} ({p['threads']} thr)", (p["p50"], p["acc"]), xytext=(10, 8 if k % 2 == 0 else -14),
                    textcoords="offset points", fontsize=8.5)
    lats = [p["p50"] for p in points]
    ax.margins(x=0.25, y=0.25)
    if min(lats) > 0 and max(lats) / min(lats) > 20:
        ax.set_xscale("log")
    else:
        ax.set_xlim(left=0)
    ax.set_xlabel("p50 latency, batch 1, best thread count (ms)")
    ax.set_ylabel(_METRIC_LABELS.get(metric, metric))
    if metric in _PERCENT_METRICS:
        ax.yaxis.set_major_formatter(lambda v, _pos: f"{v * 100:.1f} %")
    ax.set_title("accuracy vs. latency (marker area ∝ size)", fontsize=10.5)
    ax.grid(True, alpha=0.3)
    legend = ax.legend(title="runtime", fontsize=8.5, title_fontsize=8.5, loc="best")
    for handle in legend.legend_handles:
        handle.set_sizes([60])  # the legend tells runtimes apart, not sizes


def _draw_bars(ax, title: str, labels: list[str], values: list[float], unit: str | None, fmt, tick_fmt) -> None:
    ys = range(len(labels))
    ax.barh(ys, values, color="C0", alpha=0.75)
    ax.set_yticks(list(ys), labels, fontsize=8.5)
    ax.invert_yaxis()  # first step on top, like the tables
    fmt = fmt or (lambda v: f"{v:.4g}")
    for y, v in zip(ys, values):
        ax.annotate(fmt(v), (v, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    ax.margins(x=0.3)
    if tick_fmt is not None:  # a share: 0-100 %, room on the right for the value labels
        ax.set_xlim(0, 1.25)
        ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.xaxis.set_major_formatter(tick_fmt)
    ax.set_xlabel(unit or "")
    ax.set_title(title, fontsize=10.5)
    ax.grid(True, axis="x", alpha=0.3)
