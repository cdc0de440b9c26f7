"""CoDeNet on embedded FPGAs: the deformable-convolution trade-off, bit-exact C-simulation, and hls4ml (issue 6).

1. Trade-off. For each decoder variant (plain 3x3, depthwise 3x3, the original
   deformable conv and its hardware-friendly restrictions) a CoDeNet-tiny is
   trained with the same seed, steps and scenes on the project's shapes
   dataset (128x128), then evaluated by AP50 on held-out scenes as float and as
   W4A8 (the fake-quant model, equal to the integer reference). Size is the
   deployed 4-bit weights plus int32 biases; MACs include bilinear sampling.
   Variants the hardware takes are lowered and estimated on Ultra96-V2 at
   250 MHz (the paper's clock); the paper-width network is also estimated at
   256x256 and 512x512 next to the paper's figures.
2. Bit-exact C-simulation: the generated C++ of the trained conv3x3 and
   dcn_dw_square_int models against the Python integer reference, every output
   value of CSIM_IMAGES images, built with -fsanitize=address,undefined.
3. hls4ml side by side on a small conv net both tools take: each tool's
   C-simulation on the same 4-bit weights, agreement with the float model,
   and what each tool can estimate without synthesis.

Run: python bench/codenet.py (about 40 min on 2 cores); writes
bench/results/codenet.md and codenet.json. Knobs: BENCH_CODENET_STEPS,
BENCH_CODENET_IMAGES, BENCH_CODENET_VARIANTS (comma list), BENCH_CODENET_CSIM.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgekit import fsio
from edgekit.errors import UserError
from edgekit.fpga.estimate import estimate
from edgekit.fpga.lower import lower
from edgekit.fpga.quantize import calibrate, fake_quant_model
from edgekit.machine import machine_info, versions
from edgekit.models.centernet import evaluate_ap50, train_detector
from edgekit.models.codenet import PRESETS, VARIANTS, CoDeNet, count_macs, model_size_bytes
from edgekit.models.shapes_detection import make_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hls4ml_peer  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = Path(os.environ.get("BENCH_CODENET_CACHE", Path.home() / ".cache" / "edgekit" / "bench_codenet"))
SEED = 0
SIZE = 128
BOARD, CLOCK = "ultra96v2", 250.0
STEPS = int(os.environ.get("BENCH_CODENET_STEPS", 600))
LR = 3e-3
IMAGES = int(os.environ.get("BENCH_CODENET_IMAGES", 4000))
EVAL_IMAGES = 300
CALIB_IMAGES = 64
CSIM_IMAGES = int(os.environ.get("BENCH_CODENET_CSIM", 20))
CSIM_VARIANTS = ("conv3x3", "dcn_dw_square_int")
ORDER = ("conv3x3", "dw3x3", "dcn", "dcn_dw", "dcn_dw_bound", "dcn_dw_square", "dcn_dw_square_int")
PAPER = {256: (26.9, 55.1), 512: (9.3, 61.7)}  # FPS, AP50 on Pascal VOC; Ultra96 at 250 MHz, 360 DSP, 216 BRAM
THREADS = 2


def variants() -> list[str]:
    chosen = os.environ.get("BENCH_CODENET_VARIANTS")
    names = chosen.split(",") if chosen else list(ORDER)
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
    return names


def hardware_estimate(model, qparams, size: int) -> dict[str, Any]:
    try:
        graph = lower(model, qparams, size)
    except UserError as e:
        return {"lowered": False, "why": str(e).split(";")[0]}
    est = estimate(graph, BOARD, CLOCK, check_fit=False)
    return {"lowered": True, **est.summary(), "overflows": est.overflows}


def trade_off_row(variant: str, train, held_out, calib) -> tuple[dict[str, Any], CoDeNet, Any]:
    torch.manual_seed(SEED)
    model = CoDeNet(variant=variant, skips=True, **PRESETS["tiny"])
    cached = CACHE / f"{variant}-{STEPS}-{IMAGES}-{SEED}.pt"
    if cached.is_file():  # a rerun (e.g. after a change to the HLS side) reuses the trained weights
        model.load_state_dict(torch.load(cached, weights_only=True))
        model.eval()
        train_seconds, final_loss = float("nan"), float("nan")
    else:
        log = train_detector(model, train, STEPS, batch_size=16, lr=LR, seed=SEED)
        with fsio.atomic_path(cached) as tmp:
            torch.save(model.state_dict(), tmp)
        train_seconds, final_loss = log.seconds, log.mean_loss(STEPS - max(1, STEPS // 10), STEPS)
    qparams = calibrate(model, calib)
    macs = count_macs(model, SIZE)
    row = {
        "variant": variant,
        "train_seconds": round(train_seconds, 1),
        "final_loss": round(final_loss, 4),
        "ap50_float": round(evaluate_ap50(model, held_out), 4),
        "ap50_w4a8": round(evaluate_ap50(fake_quant_model(qparams), held_out), 4),
        "size_bytes": model_size_bytes(model, 4),
        "macs": macs.total,
        "sampling_macs": macs.sampling,
        "hardware": hardware_estimate(model, qparams, SIZE),
    }
    print(f"  {variant}: AP50 float {row['ap50_float']:.3f}, W4A8 {row['ap50_w4a8']:.3f}, {row['train_seconds']} s training")
    return row, model, qparams


def paper_scale_rows() -> list[dict[str, Any]]:
    """The paper-width network at the paper's input sizes (structure only: the weights are untrained)."""
    rows = []
    for size in sorted(PAPER):
        torch.manual_seed(SEED)
        model = CoDeNet(variant="dcn_dw_square_int", skips=True, **PRESETS["paper"]).eval()
        qparams = calibrate(model, make_dataset(4, SEED + 1, size).tensor())
        rows.append({
            "size": size,
            "size_bytes": model_size_bytes(model, 4),
            "macs": count_macs(model, size).total,
            "hardware": hardware_estimate(model, qparams, size),
            "paper_fps": PAPER[size][0],
            "paper_ap50": PAPER[size][1],
        })
    return rows


def csim_row(variant: str, model, qparams, work: Path) -> dict[str, Any]:
    from edgekit.fpga.csim import run_csim
    from edgekit.fpga.hls import write_project

    graph = lower(model, qparams, SIZE)
    project = write_project(graph, work / variant, BOARD, CLOCK, check_fit=False)
    images = list(make_dataset(CSIM_IMAGES, SEED + 30_000, SIZE).images.transpose(0, 3, 1, 2))
    result = run_csim(project, graph, images, sanitize=True)
    return {"variant": variant, **result.summary()}


def hls4ml_rows(work: Path) -> list[dict[str, Any]]:
    """The same small conv net through hls4ml's C-simulation and edgekit's."""
    from edgekit.fpga.csim import run_csim
    from edgekit.fpga.hls import write_project
    from edgekit.fpga.reference import run_outputs

    net = hls4ml_peer.small_conv_net(SEED).eval()
    pixels = np.random.default_rng(SEED).integers(0, 256, (CSIM_IMAGES, 3, 16, 16), dtype=np.uint8)
    started = time.perf_counter()
    peer = hls4ml_peer.run_hls4ml_peer(net, pixels, work / "hls4ml")
    peer_seconds = time.perf_counter() - started
    hls_rel = peer.max_abs_err_hls_vs_float / peer.float_output_max_abs

    started = time.perf_counter()
    images = torch.from_numpy(pixels).float() / 255.0
    qparams = calibrate(net, images)
    graph = lower(net, qparams, 16)
    project = write_project(graph, work / "edgekit", BOARD, CLOCK, check_fit=False)
    result = run_csim(project, graph, list(pixels), sanitize=False)
    ek_seconds = time.perf_counter() - started
    name = graph.outputs[0]
    scale = np.asarray(graph.meta["output_scales"][name]).reshape(-1, 1, 1)
    ours = np.stack([run_outputs(graph, p)[0] * scale for p in pixels])
    with torch.no_grad():
        ref = net.double()(images.double()).numpy()
    ek_err = float(np.abs(ours - ref).max())
    est = estimate(graph, BOARD, CLOCK).summary()
    return [
        {
            "tool": f"hls4ml {_hls4ml_version()}",
            "quantization": "per-tensor power-of-two (ap_fixed), W4 A8",
            "csim_bit_exact": f"{peer.mismatches_vs_reference} mismatches vs its own fixed-point reference",
            "max_err_vs_float": round(peer.max_abs_err_hls_vs_float, 4),
            "rel_err_vs_float": round(hls_rel, 4),
            "build_seconds": round(peer_seconds, 1),
            "estimate": "none without Vitis HLS synthesis (reads csynth reports only)",
        },
        {
            "tool": "edgekit",
            "quantization": "per-channel W4, per-tensor A8, integer requantization",
            "csim_bit_exact": f"{result.mismatches} mismatches vs the integer reference ({result.values} values)",
            "max_err_vs_float": round(ek_err, 4),
            "rel_err_vs_float": round(ek_err / float(np.abs(ref).max()), 4),
            "build_seconds": round(ek_seconds, 1),
            "estimate": f"{est['dsp']} DSP, {est['bram_18k']} BRAM18K, {est['lut']} LUT, {est['ff']} FF, "
            f"{est['latency_cycles']} cycles latency",
        },
    ]


def _hls4ml_version() -> str:
    import hls4ml

    return hls4ml.__version__


def _hw_cells(hw: dict[str, Any]) -> str:
    if not hw.get("lowered"):
        return "| - | - | - | - | - | - |"
    fits = "yes" if hw["fits"] else "no: " + ", ".join(hw["overflows"])
    return f"| {hw['fps']:.1f} | {hw['dsp']} | {hw['bram_18k']} | {hw['lut']:,} | {hw['ff']:,} | {fits} |"


def write_table(result: dict[str, Any]) -> None:
    m, v = machine_info(), versions()
    lines = [
        "# CoDeNet on embedded FPGAs: deformable-convolution variants, C-simulation, hls4ml",
        "",
        f"Machine: {m.get('cpu')} ({m.get('cores')} cores, {THREADS} threads); torch {v.get('torch')}, "
        f"hls4ml {_hls4ml_version()}, g++ for C-simulation; {result['date']}. "
        f"Training: CoDeNet-tiny, {STEPS} steps of batch 16 on {IMAGES} generated 128x128 scenes, seed {SEED}; "
        f"AP50 on {EVAL_IMAGES} held-out scenes. Estimates: edgekit's analytical model of its generated architecture "
        f"(fpga/estimate.py), {BOARD} at {CLOCK:.0f} MHz. Whole run: {result['minutes']:.1f} min"
        f"{' (trained weights reused from the cache)' if result.get('cached') else ''}. "
        "Regenerate: `python bench/codenet.py`.",
        "",
        "## Trade-off of the deformable variants (CoDeNet-tiny, 128x128)",
        "",
        "| variant | AP50 float | AP50 W4A8 | size | MACs | of which sampling | est. FPS | DSP | BRAM18K | LUT | FF | fits |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    for r in result["trade_off"]:
        lines.append(
            f"| {r['variant']} | {r['ap50_float']:.3f} | {r['ap50_w4a8']:.3f} | {r['size_bytes'] / 1e3:.1f} kB | "
            f"{r['macs'] / 1e6:.1f} M | {r['sampling_macs'] / 1e6:.1f} M {_hw_cells(r['hardware'])}"
        )
        if not r["hardware"].get("lowered"):
            notes.append(f"- {r['variant']}: not lowered: {r['hardware']['why']}.")
    lines += [""] + notes
    lines += [
        "",
        "## Paper-width CoDeNet (dcn_dw_square_int) at the paper's input sizes, estimated",
        "",
        "| input | size | MACs | est. FPS | DSP | BRAM18K | LUT | FF | fits | paper FPS | paper AP50 (VOC) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["paper_scale"]:
        lines.append(
            f"| {r['size']}x{r['size']} | {r['size_bytes'] / 1e6:.2f} MB | {r['macs'] / 1e9:.2f} G "
            f"{_hw_cells(r['hardware'])} {r['paper_fps']} | {r['paper_ap50']} |"
        )
    lines += [
        "",
        "The paper: Ultra96 at 250 MHz using 360 DSP and 216 BRAM; model 0.76 MB. Its AP50 is on Pascal VOC, ours on "
        "generated shapes; only the FPS and resource columns are comparable, and ours are estimates, not synthesis.",
        "",
        f"## Bit-exact C-simulation ({CSIM_IMAGES} images, g++ with ASan/UBSan)",
        "",
        "| variant | images | values compared | mismatches | compile s | run s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["csim"]:
        lines.append(f"| {r['variant']} | {r['images']} | {r['values']:,} | {r['mismatches']} | {r['compile_seconds']} | {r['run_seconds']} |")
    lines += [
        "",
        f"## hls4ml side by side (conv3x3 3->8, ReLU, conv3x3 8->8, ReLU, conv1x1 8->4; 16x16; {CSIM_IMAGES} images)",
        "",
        "| tool | quantization | C-simulation | max abs error vs float | relative | build + csim s | resource / latency estimate |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["hls4ml"]:
        lines.append(
            f"| {r['tool']} | {r['quantization']} | {r['csim_bit_exact']} | {r['max_err_vs_float']} | "
            f"{r['rel_err_vs_float']:.2%} | {r['build_seconds']} | {r['estimate']} |"
        )
    fsio.write_text(RESULTS / "codenet.md", "\n".join(lines) + "\n")
    fsio.write_json(RESULTS / "codenet.json", result)
    print(f"wrote {RESULTS / 'codenet.md'}")


def main() -> None:
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    print(f"generating {IMAGES} + {EVAL_IMAGES} scenes")
    train = make_dataset(IMAGES, SEED, SIZE)
    held_out = make_dataset(EVAL_IMAGES, SEED + 10_000, SIZE)
    calib = make_dataset(CALIB_IMAGES, SEED + 20_000, SIZE).tensor()
    trade_off, csim = [], []
    with tempfile.TemporaryDirectory(prefix="bench_codenet_") as tmp:
        for variant in variants():
            row, model, qparams = trade_off_row(variant, train, held_out, calib)
            trade_off.append(row)
            if variant in CSIM_VARIANTS and CSIM_IMAGES:
                csim.append(csim_row(variant, model, qparams, Path(tmp)))
                print(f"  csim {variant}: {csim[-1]['mismatches']} mismatches in {csim[-1]['values']} values")
        paper = paper_scale_rows()
        peers = hls4ml_rows(Path(tmp))
    write_table({
        "date": datetime.now(UTC).date().isoformat(),
        "minutes": (time.perf_counter() - started) / 60,
        "steps": STEPS,
        "images": IMAGES,
        "cached": any(r["train_seconds"] != r["train_seconds"] for r in trade_off),  # NaN: weights came from the cache
        "trade_off": trade_off,
        "paper_scale": paper,
        "csim": csim,
        "hls4ml": peers,
        "machine": machine_info(),
        "versions": versions(),
    })


if __name__ == "__main__":
    main()
