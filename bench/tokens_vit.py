"""ViT token compression (issue 8): Token Transforming vs ToMe merging vs top-k
pruning at equal FLOPs cuts, training-free, on edgekit's own ViT.

Model: ``vit_digits`` (64x64, conv stem to 8x8 patches: 64 patch tokens + CLS,
dim 64, depth 6, 4 heads) trained from scratch on ``digits_canvas`` (real
scikit-learn digits enlarged onto a noisy 64x64 canvas: 10 classes) with
edgekit's ``train.supervised`` pass; the weights are cached in bench/.cache.
Test images come from ``digits_canvas_test``: digits the training never saw.

Latency at that size is dominated by per-operator overhead (a 1-2 ms model), so
the same schedules are also timed on a DeiT-S-shaped ViT (``deit_small``: 196
patch tokens + CLS, dim 384, depth 12; random weights, since latency does not
depend on them), the model the paper reports its 1.5x on.

For each FLOPs cut and method the ``tokens.transform`` pass compresses the
trained model (schedule solved for the cut from layer ``START_LAYER`` on, the
same rule for every method); then the bench measures: the blocks' MACs with
the FLOPs accounting (a batch-1 forward under PyTorch's FLOP counter), top-1 on
the held-out set, and ONNX Runtime latency (1 thread, batch 1) as a ratio to
the uncompressed ONNX model: in each round every model is timed right beside a
block of the uncompressed one, and the result is the median of those ratios.

Called by bench/tokens.py: ``vit_section(quick)`` returns (markdown, dict).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
SEEDS = {"train": 1, "test": 2}
START_LAYER = 0
METHODS = ("transform", "tome", "prune")
FULL = {"train": 10000, "epochs": 10, "test": 3000, "cuts": (0.2, 0.3, 0.4, 0.5), "rounds": 9, "block": 0.2, "deit_block": 0.5}
QUICK = {"train": 1000, "epochs": 2, "test": 300, "cuts": (0.4,), "rounds": 2, "block": 0.2, "deit_block": 0.3}
TRAIN = {"batch_size": 64, "lr": 2e-3, "weight_decay": 0.05, "label_smoothing": 0.1}


def _data(n: int, seed: int, inputs, test: bool = False):
    from edgekit.models.datasets import generate

    return generate("digits_canvas_test" if test else "digits_canvas", n, seed, inputs, {"batch": 1})


def train_model(settings: dict, log=print):
    """vit_digits trained on digits_canvas through the train.supervised pass (cached by settings)."""
    import torch

    from edgekit.artifact import Artifact
    from edgekit.compress.train import TrainConfig, TrainSupervised
    from edgekit.models.vit import image_inputs, vit_digits
    from edgekit.passes import PassContext

    inputs = image_inputs(64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = vit_digits().eval()
    art = Artifact(format="torch", inputs=inputs, task="classification", module=module,
                   builder={"kind": "zoo", "name": "vit_digits", "args": {}})
    recipe = {"n": settings["train"], "epochs": settings["epochs"], **TRAIN, "seed": SEEDS["train"], "model": "vit_digits-v1"}
    key = "tokens_vit-" + hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    cached = (CACHE / "weights" / f"{key}.pt").is_file()
    split = _data(settings["train"], SEEDS["train"], inputs) if not cached else types.SimpleNamespace(arrays={}, labels=np.zeros(1, np.int64))
    data = types.SimpleNamespace(split=lambda name: split)
    ctx = PassContext(workdir=CACHE, data=data, seed=0, cache_dir=CACHE, key=key, log=log)
    cfg = TrainConfig(epochs=settings["epochs"], **TRAIN)
    started = time.perf_counter()
    trained = TrainSupervised(cfg).run(art, ctx)
    info = {**ctx.metrics.get("train", {}), "wall_seconds": round(time.perf_counter() - started, 1)}
    return trained, info


def top1(module, pixels: np.ndarray, labels: np.ndarray, batch: int = 250) -> float:
    import torch

    correct = 0
    with torch.no_grad():
        for i in range(0, len(labels), batch):
            logits = module(torch.from_numpy(pixels[i : i + batch]))
            correct += int((logits.argmax(1).numpy() == labels[i : i + batch]).sum())
    return correct / len(labels)


def compress(trained, method: str, cut: float, feed: dict | None = None, **knobs):
    """The tokens.transform pass on the trained artifact: (artifact, its tokens metrics)."""
    from edgekit.compress.tokens.transform import TokenTransform, TokenTransformConfig
    from edgekit.passes import PassContext

    feed = feed or {"pixel_values": _data(1, 99, trained.inputs, test=True).arrays["pixel_values"]}
    ctx = PassContext(workdir=Path(tempfile.gettempdir()), samples=lambda n: [feed] * n, log=lambda s: None)
    cfg = TokenTransformConfig(method=method, flops_cut=cut, start_layer=START_LAYER, **knobs)
    out = TokenTransform(cfg).run(trained, ctx)
    return out, ctx.metrics["tokens"]


def export(artifact, folder: Path) -> Path:
    from edgekit.export.onnx import ExportOnnx, OnnxConfig
    from edgekit.passes import PassContext

    folder.mkdir(parents=True, exist_ok=True)
    ctx = PassContext(workdir=folder, dims={"batch": 1}, log=lambda s: None)
    out = ExportOnnx(OnnxConfig(dynamic=False, verify={"samples": 2})).run(artifact, ctx)
    return out.path()


def latency_ratios(paths: dict[str, Path], feed: dict, rounds: int, block: float) -> dict[str, float]:
    """Each model's batch-1 latency / the dense model's (1 thread): the median over rounds of
    the ratio to a dense block timed right beside it.

    On this shared machine a core's speed drifts by up to 1.7x over seconds, so
    every model is paired with a dense block of its own (in alternating order
    from round to round) instead of with one dense block per round."""
    import onnxruntime as ort

    sys.path.insert(0, str(HERE))
    from quantization import time_block

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sessions = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    ratios: dict[str, list[float]] = {k: [] for k in paths if k != "dense"}
    dense_ms: list[float] = []
    for i in range(rounds):
        for k, values in ratios.items():
            if i % 2:
                model, base = time_block(sessions[k], feed, block), time_block(sessions["dense"], feed, block)
            else:
                base, model = time_block(sessions["dense"], feed, block), time_block(sessions[k], feed, block)
            values.append(model / base)
            dense_ms.append(base * 1e3)
    out = {k: round(statistics.median(v), 3) for k, v in ratios.items()}
    out["dense_ms"] = round(statistics.median(dense_ms), 3)
    return out


def deit_latency(settings: dict, log=print) -> dict:
    """The same schedules on a DeiT-S-shaped ViT (random weights): measured MACs cut and ONNX Runtime latency ratio."""
    import torch

    from edgekit.artifact import Artifact
    from edgekit.models.vit import deit_small, image_inputs

    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = deit_small().eval()
    art = Artifact(format="torch", inputs=image_inputs(224), task="classification", module=module,
                   builder={"kind": "zoo", "name": "deit_small", "args": {}})
    feed = {"pixel_values": _data(1, 99, art.inputs, test=True).arrays["pixel_values"]}
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"dense": export(art, Path(tmp) / "dense")}
        for cut in settings["cuts"]:
            for method in METHODS:
                log(f"  deit_small: {method} at {cut:.0%}")
                out, info = compress(art, method, cut, feed)
                name = f"{method}@{cut}"
                paths[name] = export(out, Path(tmp) / name.replace("@", "_"))
                rows[name] = {"block_macs_cut": info["block_macs_cut"], "total_macs_cut": info["total_macs_cut"]}
        lat = latency_ratios(paths, feed, settings["rounds"], settings["deit_block"])
    for name, r in rows.items():
        r["latency_ratio"] = lat[name]
    return {"dense_ms": lat["dense_ms"], "rows": rows}


def vit_section(quick: bool) -> tuple[str, dict]:
    """Train (or load) the ViT, compress it every way at every cut, measure; (markdown, results)."""
    from edgekit.compress.tokens.accounting import token_flops

    settings = QUICK if quick else FULL
    started = time.perf_counter()
    trained, train_info = train_model(settings)
    test = _data(settings["test"], SEEDS["test"], trained.inputs, test=True)
    pixels, labels = test.arrays["pixel_values"], test.labels
    feed = {"pixel_values": pixels[:1]}
    dense_acc = top1(trained.module, pixels, labels)
    dense_macs = token_flops(trained.module, feed)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"dense": export(trained, Path(tmp) / "dense")}
        for cut in settings["cuts"]:
            for method in METHODS:
                art, info = compress(trained, method, cut)
                name = f"{method}@{cut}"
                paths[name] = export(art, Path(tmp) / name.replace("@", "_"))
                rows.append({
                    "cut_target": cut, "method": method, "top1": round(top1(art.module, pixels, labels), 4),
                    "block_macs": info["block_macs"], "block_macs_cut": info["block_macs_cut"],
                    "tokens_in": info["tokens_in"], "remove": info["remove"],
                })
        lat = latency_ratios(paths, feed, settings["rounds"], settings["block"])
    deit = deit_latency(settings)
    for r in rows:
        r["latency_ratio"] = lat[f"{r['method']}@{r['cut_target']}"]
        r["drop_points"] = round(100 * (dense_acc - r["top1"]), 2)
        d = deit["rows"][f"{r['method']}@{r['cut_target']}"]
        r["deit_latency_ratio"], r["deit_block_macs_cut"] = d["latency_ratio"], d["block_macs_cut"]
    result = {
        "model": "vit_digits", "dataset": "digits_canvas (test: digits_canvas_test)", "quick": quick, "train": train_info, "settings": settings,
        "start_layer": START_LAYER, "test_samples": len(labels), "dense_top1": round(dense_acc, 4),
        "dense_block_macs": dense_macs["block_macs"], "dense_ms": lat["dense_ms"], "deit_dense_ms": deit["dense_ms"], "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return _markdown(result), result


def _markdown(res: dict) -> str:
    lines = [
        "## ViT: Token Transforming vs ToMe vs top-k pruning (training-free)",
        "",
        (
            f"vit_digits (64 patch tokens + CLS, dim 64, depth 6) trained on digits_canvas ({res['settings']['train']} images, "
            f"{res['settings']['epochs']} epochs), top-1 on {res['test_samples']} images of digits_canvas_test (glyphs never trained on). "
            f"Uncompressed: top-1 {100 * res['dense_top1']:.2f}%, "
            f"block MACs {res['dense_block_macs'] / 1e6:.1f} M, ONNX Runtime {res['dense_ms']:.3f} ms (1 thread, batch 1). "
            "Speedup = uncompressed / compressed ONNX Runtime latency (1 thread, batch 1): the median over "
            f"{res['settings']['rounds']} rounds of the ratio to an uncompressed block timed beside it; "
            f"DeiT-S columns: the same method and cut on `deit_small` (196 + 1 tokens, dim 384, depth 12, random weights; "
            f"uncompressed {res['deit_dense_ms']:.1f} ms)."
        ),
        "",
        "| FLOPs cut | method | block MACs cut (measured) | tokens entering each block | top-1 % | drop (points) | speedup | DeiT-S MACs cut | DeiT-S speedup |",
        "| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['cut_target']:.0%} | {r['method']} | {r['block_macs_cut']:.1%} | {' '.join(map(str, r['tokens_in']))} | "
            f"{100 * r['top1']:.2f} | {r['drop_points']:+.2f} | {1 / r['latency_ratio']:.2f}x | "
            f"{r['deit_block_macs_cut']:.1%} | {1 / r['deit_latency_ratio']:.2f}x |"
        )
    best = {}
    for r in res["rows"]:
        best.setdefault(r["cut_target"], []).append((r["top1"], r["method"]))
    wins = [c for c, v in best.items() if max(v)[1] == "transform"]
    lines += ["", f"Token Transforming has the best top-1 at {len(wins)} of {len(best)} cuts."]
    return "\n".join(lines) + "\n"
