"""The literature zoo (issue 10): size, accuracy and what the deploy transform buys on each runtime.

For every registered variant of the seven families (UniRepLKNet, LSNet, HorNet,
FFNet, SGConv, ConvFirst, HyperZ.Z.W): params and MACs of both forms, top-1 on
held-out digits after a short training (``digits_canvas`` at 32x32: real
scikit-learn digits on noisy canvases; test glyphs are never seen in training;
edgekit's ``train.supervised`` pass, weights cached in bench/.cache), and the
batch-1 latency of the training form and the deploy form (``reparam``) on ONNX
Runtime, LiteRT and TVM (untuned, llvm host target), each export made and
parity-checked by edgekit's exporters. Latency is timed in interleaved rounds
(each form in its own block: warm-up, then repeats for ``BLOCK`` seconds; one
thread) and reported as the median of per-round ratios.

The same file gets two kernel sections written by helper modules:
bench/zoo_convfirst.py (ConvFirst block fused tile by tile vs unfused) and
bench/zoo_fftconv.py (long convolution as FFT, direct and Monarch matmuls at
sequence lengths 1k to 64k).

Tiny and small variants are measured; LiteRT and TVM (a compile per form) for
the tiny ones unless ``--all-runtimes``.

Run: python bench/zoo.py [--quick] [--only FAMILY,...] [--all-runtimes]   (or `make bench`)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
import types
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

# The ConvFirst C kernels share torch's OpenMP runtime, whose spinning workers starve a
# shared 2-core machine; it reads this once, when torch loads (run this script on its own).
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
RESULTS = HERE / "results"
FAMILIES = ("unireplknet", "lsnet", "hornet", "ffnet", "sgconv", "convfirst", "terminator")
TRAIN = {"n": 2000, "epochs": 6, "lr": 3e-3, "weight_decay": 0.05, "batch_size": 50}
TEST_N = 1000
RUNTIMES = {"onnx": "onnxruntime", "tflite": "litert", "tvm": "tvm"}
ROUNDS, BLOCK = 5, 0.4


def variants(only: list[str] | None) -> list[str]:
    from edgekit.models import list_models

    return [n for n in list_models() if n.split("_")[0] in (only or FAMILIES)]


def digits(n: int, seed: int, test: bool):
    from edgekit.models.datasets import generate
    from edgekit.models.registry import image_inputs

    return generate("digits_canvas_test" if test else "digits_canvas", n, seed, image_inputs(32), {"batch": 1})


def train(name: str, log=print):
    """The variant trained on digits_canvas by the train.supervised pass (cached by name and settings)."""
    import torch

    from edgekit.artifact import Artifact
    from edgekit.compress.train import TrainConfig, TrainSupervised
    from edgekit.models import create_model, model_info
    from edgekit.passes import PassContext

    info = model_info(name)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = create_model(name, num_classes=10).eval()
    art = Artifact(format="torch", inputs=info.inputs, task="classification", outputs=["logits"], module=module)
    source = Path(sys.modules[type(module).__module__].__file__).read_bytes()  # new code, new weights
    key = "zoo-" + hashlib.sha256(json.dumps({"model": name, **TRAIN}, sort_keys=True).encode() + source).hexdigest()[:16]
    cached = (CACHE / "weights" / f"{key}.pt").is_file()
    split = digits(TRAIN["n"], 1, test=False) if not cached else types.SimpleNamespace(arrays={}, labels=np.zeros(1, np.int64))
    ctx = PassContext(workdir=CACHE, data=types.SimpleNamespace(split=lambda _s: split), cache_dir=CACHE, key=key, log=log)
    cfg = TrainConfig(epochs=TRAIN["epochs"], lr=TRAIN["lr"], weight_decay=TRAIN["weight_decay"], batch_size=TRAIN["batch_size"])
    started = time.perf_counter()
    trained = TrainSupervised(cfg).run(art, ctx)
    return trained, {**ctx.metrics.get("train", {}), "wall_seconds": round(time.perf_counter() - started, 1)}


def reparam(trained):
    from edgekit.compress.reparam import Reparam, ReparamConfig
    from edgekit.passes import PassContext

    ctx = PassContext(workdir=Path(tempfile.gettempdir()), dims={"batch": 1}, log=lambda _m: None)
    return Reparam(ReparamConfig()).run(trained, ctx), ctx.metrics["reparam"]


def top1(module, test) -> float:
    import torch

    with torch.no_grad():
        logits = module(torch.from_numpy(test.arrays["image"]))
    return float((logits.argmax(1).numpy() == test.labels).mean())


def export(artifact, fmt: str, folder: Path):
    """(exported artifact, verify metrics), or (None, the error) when the export fails."""
    from edgekit.passes import PassContext, get_pass

    cls = get_pass(f"export.{fmt}")
    folder.mkdir(parents=True)
    ctx = PassContext(workdir=folder, dims={"batch": 1}, log=lambda _m: None, run_dir=folder.parent / "run")
    try:
        out = cls(cls.Config()).run(artifact, ctx)
    except Exception as e:  # one failing export is a table cell, not a lost benchmark
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return out, ctx.metrics["verify"]


def time_block(session, feed, seconds: float) -> float:
    for _ in range(3):
        session.run(feed)
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t = time.perf_counter()
        session.run(feed)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def speedup(train_art, deploy_art, runtime: str, feed, rounds: int, block: float) -> tuple[float, float]:
    """(median over rounds of train-form latency / deploy-form latency, deploy-form median ms)."""
    from edgekit.runtimes import load_session

    sessions = [load_session(a, runtime, threads=1) for a in (train_art, deploy_art)]
    ratios, deploy_ms = [], []
    for _ in range(rounds):
        t_train = time_block(sessions[0], feed, block)
        time.sleep(0.05)
        t_deploy = time_block(sessions[1], feed, block)
        time.sleep(0.05)
        ratios.append(t_train / t_deploy)
        deploy_ms.append(t_deploy * 1e3)
    return statistics.median(ratios), statistics.median(deploy_ms)


def measure(name: str, test, formats: list[str], rounds: int, block: float, log=print) -> dict:
    from edgekit.profile import profile_artifact

    trained, train_info = train(name, log)
    deployed, rep = reparam(trained)
    row = {
        "model": name,
        "params": rep["params_before"],
        "params_deploy": rep["params_after"],
        "macs": profile_artifact(trained, {"batch": 1})["macs"],
        "macs_deploy": profile_artifact(deployed, {"batch": 1})["macs"],
        "top1": top1(trained.module, test),
        "top1_deploy": top1(deployed.module, test),
        "deploy_max_rel_diff": rep["max_rel_diff"],
        "train_seconds": train_info.get("seconds"),
        "runtimes": {},
    }
    feed = {"image": test.arrays["image"][:1]}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in formats:
            exported = {}
            for form, art in (("train", trained), ("deploy", deployed)):
                exported[form], verify = export(art, fmt, Path(tmp) / f"{fmt}-{form}")
                row["runtimes"].setdefault(fmt, {})[f"verify_{form}"] = verify if isinstance(verify, str) else verify.get("max_abs")
            if exported["train"] is None or exported["deploy"] is None:
                continue
            ratio, ms = speedup(exported["train"], exported["deploy"], RUNTIMES[fmt], feed, rounds, block)
            row["runtimes"][fmt].update(speedup=round(ratio, 3), deploy_ms=round(ms, 3))
            log(f"  {name} {fmt}: deploy {ms:.3f} ms, {ratio:.2f}x faster than the training form")
    return row


def _fmt_count(n) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.0f} K"


def _cell(rec: dict | None) -> str:
    if not rec:
        return "not run"
    if "speedup" not in rec:
        failed = [v for v in (rec.get("verify_train"), rec.get("verify_deploy")) if isinstance(v, str)]
        return f"export failed: {failed[0]}" if failed else "n/a"
    return f"{rec['speedup']:.2f}x ({rec['deploy_ms']:.2f} ms)"


def zoo_markdown(rows: list[dict], formats: list[str]) -> str:
    head = ["variant", "params (train / deploy)", "MACs (train / deploy)", "top-1 (train / deploy)"]
    head += [f"{RUNTIMES[f]} deploy speed-up (deploy ms)" for f in formats]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["model"], f"{_fmt_count(r['params'])} / {_fmt_count(r['params_deploy'])}", f"{_fmt_count(r['macs'])} / {_fmt_count(r['macs_deploy'])}",
                 f"{100 * r['top1']:.1f}% / {100 * r['top1_deploy']:.1f}%"]
        cells += [_cell(r["runtimes"].get(f)) for f in formats]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header(threads: str) -> str:
    from edgekit.machine import machine_info, versions

    m, v = machine_info(), versions()
    return (f"Machine: {m.get('cpu')} ({m.get('cores')} cores); torch {v.get('torch')}, onnxruntime {v.get('onnxruntime')}, "
            f"litert-torch {v.get('litert-torch')}, ai-edge-litert {v.get('ai-edge-litert')}, apache-tvm {v.get('apache-tvm')}; {threads}; {datetime.now(UTC).date()}.")


def main() -> None:
    import torch

    from edgekit import fsio

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny variants, ONNX Runtime only, short timing blocks")
    parser.add_argument("--all-runtimes", action="store_true", help="LiteRT and TVM for every variant (default: tiny variants only)")
    parser.add_argument("--only", default="", help="comma-separated families (default: all)")
    parser.add_argument("--skip-kernels", action="store_true", help="leave out the ConvFirst and FFT-convolution sections")
    args = parser.parse_args()
    torch.set_num_threads(2)
    names = [n for n in variants([f for f in args.only.split(",") if f] or None) if n.endswith(("_tiny", "_small"))]
    names = [n for n in names if not args.quick or n.endswith("_tiny")]
    formats = ["onnx"] if args.quick else ["onnx", "tflite", "tvm"]
    rounds, block = (2, 0.2) if args.quick else (ROUNDS, BLOCK)
    test = digits(TEST_N, 2, test=True)
    rows = []
    for name in names:
        print(f"== {name}", flush=True)
        fmts = formats if args.all_runtimes or name.endswith("_tiny") else ["onnx"]
        rows.append(measure(name, test, fmts, rounds, block))
    sections = [
        "# Model zoo: deploy transforms on three runtimes\n",
        header("training: torch 2 threads; timing: 1 thread, batch 1"),
        f"\nEach variant trained {TRAIN['epochs']} epochs on {TRAIN['n']} generated digit images (32x32, 10 classes; "
        f"AdamW, one-cycle lr {TRAIN['lr']}), top-1 on {TEST_N} images of glyphs training never saw. "
        "Speed-up = training-form latency / deploy-form latency on the same runtime (median of "
        f"{rounds} interleaved rounds); both exports passed edgekit's parity check unless the cell says otherwise. "
        "MACs from PyTorch's FLOP counter (FFTs are not counted).\n",
        zoo_markdown(rows, formats),
    ]
    data = {"rows": rows}
    if not args.skip_kernels:
        sys.path.insert(0, str(HERE))
        from zoo_convfirst import convfirst_table
        from zoo_fftconv import fftconv_table

        for title, fn in (("ConvFirst block: fused tile by tile vs unfused", convfirst_table), ("Long convolution: FFT vs direct vs Monarch", fftconv_table)):
            print(f"== {title}", flush=True)
            table_rows, table = fn()
            sections += [f"\n## {title}\n", table]
            data[title] = table_rows
    RESULTS.mkdir(exist_ok=True)
    name = "zoo_quick" if args.quick else "zoo"
    fsio.write_text(RESULTS / f"{name}.md", "\n".join(sections) + "\n")
    fsio.write_json(RESULTS / f"{name}.json", data)
    print(f"wrote {RESULTS / f'{name}.md'}")


if __name__ == "__main__":
    main()
