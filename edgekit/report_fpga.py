"""The FPGA part of the report: accuracy at W4A8, the estimate on the board, and the C-simulation.

Reads the ``fpga`` metrics that fpga.hls leaves in a step's manifest.
"""

from __future__ import annotations

from typing import Any


def render_fpga_section(steps: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for step in steps:
        m = (step.get("metrics") or {}).get("fpga")
        if not m:
            continue
        est = m.get("estimate") or {}
        lines += ["", f"## FPGA ({step.get('id', '?')})", ""]
        lines.append(
            f"{est.get('board')} ({est.get('part')}) at {m.get('clock_mhz')} MHz, {m.get('layers')} integer layers: "
            f"estimated {_num(est.get('fps'), '.1f')} FPS, latency {_num(est.get('latency_ms'), '.2f')} ms, "
            f"slowest process {est.get('bottleneck')} (an analytical estimate; Vitis HLS csynth gives the real figures)."
        )
        used, avail = est, est.get("available") or {}
        lines += ["", "| Resource | Used | Available | Share |", "| --- | ---: | ---: | ---: |"]
        for key, label in (("dsp", "DSP"), ("bram_18k", "BRAM 18K"), ("lut", "LUT"), ("ff", "FF")):
            if key in used and key in avail:
                lines.append(f"| {label} | {used[key]:,} | {avail[key]:,} | {used[key] / avail[key]:.0%} |")
        if "ap50_float" in m:
            lines.append(f"\nAP50: float {m['ap50_float']:.3f}, W4A8 integer {m['ap50_w4a8']:.3f}.")
        csim = m.get("csim")
        if csim:
            verdict = "every value equal to the integer reference" if csim.get("mismatches") == 0 else f"{csim.get('mismatches')} mismatches"
            lines.append(f"\nC-simulation (g++): {csim.get('values', 0):,} output values on {csim.get('images')} images, {verdict}.")
    return lines


def _num(v: Any, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "–"
