"""The report: report.json (everything), report.md (tables a person reads),
report.png (accuracy vs. latency, marker area by size)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgekit import fsio

DASH = "–"


def write_report(run_dir: Path, report: dict[str, Any], formats: list[str]) -> list[Path]:
    run_dir = Path(run_dir)
    written = []
    if "json" in formats:
        fsio.write_json(run_dir / "report.json", report)
        written.append(run_dir / "report.json")
    if "md" in formats:
        fsio.write_text(run_dir / "report.md", render_markdown(report))
        written.append(run_dir / "report.md")
    if "png" in formats:
        plot(report, run_dir / "report.png")
        written.append(run_dir / "report.png")
    return written


# -- formatting helpers ------------------------------------------------------------

def _size(n: int | None) -> str:
    if not n:
        return DASH
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def _count(n: int | None) -> str:
    if n is None:
        return DASH
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _acc(a: dict[str, Any] | None) -> str:
    if not a:
        return DASH
    return f"{a['metric']} {a['value']:.4f}"


def headline_bench(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The bench entry the main table shows: batch 1 with the fewest threads, else the first."""
    entries = metrics.get("bench") or []
    if not entries:
        return None
    batch1 = [b for b in entries if b["batch_size"] == 1]
    return min(batch1, key=lambda b: b["threads"]) if batch1 else entries[0]


# -- markdown ----------------------------------------------------------------------

def render_markdown(report: dict[str, Any]) -> str:
    m, v = report.get("machine", {}), report.get("versions", {})
    steps = report.get("steps", [])
    src = steps[0]["metrics"] if steps else {}
    lines = [
        f"# edgekit report: {report.get('name', '')}",
        "",
        f"{m.get('cpu', '?')} ({m.get('cores', '?')} cores) · torch {v.get('torch')} · onnxruntime {v.get('onnxruntime')} · "
        f"edgekit {v.get('edgekit')} · {report.get('created', '')}",
        "",
        "| step | format | accuracy | Δ accuracy | size | size vs source | params | MACs | p50 latency | throughput |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in steps:
        met = s.get("metrics", {})
        acc, src_acc = met.get("accuracy"), src.get("accuracy")
        delta = f"{acc['value'] - src_acc['value']:+.4f}" if acc and src_acc and acc["metric"] == src_acc["metric"] else DASH
        ratio = f"{met['size_bytes'] / src['size_bytes']:.2f}x" if met.get("size_bytes") and src.get("size_bytes") else DASH
        b = headline_bench(met)
        lat = f"{b['latency_ms']['p50']:.3f} ms ({b['runtime']}, {b['threads']} thr)" if b else DASH
        thr = f"{b['throughput_sps']:.1f}/s" if b and b.get("throughput_sps") else DASH
        cached = " (reused)" if s.get("cached") else ""
        lines.append(
            f"| {s['id']}{cached} | {s['format']} | {_acc(acc)} | {delta} | {_size(met.get('size_bytes'))} | {ratio} | "
            f"{_count(met.get('params'))} | {_count(met.get('macs'))} | {lat} | {thr} |"
        )
    bench_rows = [(s["id"], b) for s in steps for b in s.get("metrics", {}).get("bench", [])]
    if bench_rows:
        lines += [
            "",
            "## Benchmarks",
            "",
            "| step | runtime | threads | batch | p50 ms | p90 ms | p99 ms | throughput | peak RSS |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for sid, b in bench_rows:
            lat = b["latency_ms"]
            rss = f"{b['peak_rss_mb']:.0f} MB" if b.get("peak_rss_mb") else DASH
            lines.append(
                f"| {sid} | {b['runtime']} {b.get('runtime_version') or ''} | {b['threads']} | {b['batch_size']} | "
                f"{lat['p50']:.3f} | {lat['p90']:.3f} | {lat['p99']:.3f} | {b.get('throughput_sps') or 0:.1f}/s | {rss} |"
            )
        lines += ["", f"Each entry: {bench_rows[0][1].get('warmup')} warm-up runs, then {bench_rows[0][1].get('repeats')} timed runs"
                  + (", each model in its own process." if bench_rows[0][1].get("isolated") else ", in-process.")]
    verify_rows = [(s["id"], s["metrics"]["verify"]) for s in steps if s.get("metrics", {}).get("verify")]
    if verify_rows:
        lines += [
            "",
            "## Parity with the source",
            "",
            "| export | runtime | samples | max abs | mean abs | max rel | top-1 agreement | atol | passed |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for sid, r in verify_rows:
            agree = f"{r['top1_agreement']:.3f}" if r.get("top1_agreement") is not None else DASH
            lines.append(
                f"| {sid} | {r.get('runtime')} | {r.get('samples')} | {r['max_abs']:.2e} | {r['mean_abs']:.2e} | {r['max_rel']:.2e} | "
                f"{agree} | {r['atol']:.0e} | {'yes' if r['passed'] else 'no'} |"
            )
    lines += ["", f"Machine: {json.dumps(m)}", ""]
    return "\n".join(lines)


# -- plot --------------------------------------------------------------------------

def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = report.get("steps", [])
    points: dict[tuple[str, str], tuple] = {}
    for s in steps:
        met = s.get("metrics", {})
        acc = met.get("accuracy")
        for b in met.get("bench", []):
            if b["batch_size"] != 1 or not acc:
                continue
            key = (s["id"], b["runtime"])
            lat = b["latency_ms"]["p50"]
            if key not in points or lat < points[key][2]:  # the best thread count per step and runtime
                points[key] = (s["id"], b["runtime"], lat, acc["value"], met.get("size_bytes") or 0, acc["metric"], b["threads"])
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    if points:
        biggest = max(p[4] for p in points.values()) or 1
        for sid, rt, lat, acc, size, metric, thr in points.values():
            ax.scatter(lat, acc, s=40 + 400 * size / biggest, alpha=0.65, label=f"{sid} · {rt} ({thr} thr)")
        ax.set_xscale("log")
        ax.set_xlabel("p50 latency at batch 1, best thread count (ms, log scale)")
        ax.set_ylabel(next(iter(points.values()))[5])
        ax.set_title(f"{report.get('name', '')}: accuracy vs. latency (marker area ~ model size)", pad=12)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best", markerscale=0.5)
    else:
        ids = [s["id"] for s in steps]
        sizes = [(s.get("metrics", {}).get("size_bytes") or 0) / 1e6 for s in steps]
        ax.bar(ids, sizes)
        ax.set_ylabel("size (MB)")
        ax.set_title(f"{report.get('name', '')}: model size per step (no latency or accuracy measured)")
        plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=8)
    fig.tight_layout()
    with fsio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
