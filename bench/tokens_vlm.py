"""FastV vs FEATHER on edgekit's tiny VLM: which image rows survive, and what localization costs.

The VLM section of bench/tokens.py (issue 8). ``zoo:tiny_vlm`` (conv-stem ViT
encoder, 8-block causal LM with RoPE) is trained on the generated
``synth:shapes_vqa`` questions with edgekit's own ``train.supervised`` pass
(weights cached under bench/.cache/). Then, on held-out questions, for no
pruning and for ``tokens.feather`` with method fastv, fastv_norope and feather
(FastV's keep share set for equal LM compute with FEATHER's schedule):

- accuracy on localization questions ("which quadrant holds the red triangle ?"),
  also split by the half of the image the target is in (the answer names it),
  and on the other questions (colour, count, existence);
- LM-block MACs of one batch-1 forward, from the pass's own accounting;
- which image rows the criterion keeps at the first stage and after the last
  one: mean kept row (0 = top, 7 = bottom; 3.5 is uniform) and the share of
  kept tokens in the top half of the image.

No ``__main__`` guard: bench/tokens.py calls :func:`vlm_section`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
MODEL = "tiny_vlm"
SEED = 0
EVAL_SEED = 987654
# (train samples, epochs, eval samples); quick trains a smaller model run of its own
FULL = {"train": 24000, "epochs": 8, "eval": 2000}
QUICK = {"train": 2000, "epochs": 3, "eval": 600}
# at 3e-3 without clipping the LM's loss stalls at the answer prior (localization at chance)
TRAIN = {"batch_size": 32, "lr": 1e-3, "weight_decay": 0.01, "grad_clip": 1.0}
MODEL_ARGS: dict[str, Any] = {}
METHODS = ("none", "fastv", "fastv_norope", "feather")


class _Data:
    """The one split train.supervised reads."""

    def __init__(self, arrays, labels):
        from edgekit.data import Split

        self._split = Split("train", arrays, labels)

    def split(self, name: str):
        return self._split


def train_vlm(size: dict[str, int], log=print):
    """``tiny_vlm`` trained by edgekit's train.supervised pass on shapes_vqa; cached weights when present."""
    import torch

    from edgekit.artifact import Artifact
    from edgekit.compress.train import TrainConfig, TrainSupervised
    from edgekit.models import create_model, model_info
    from edgekit.models.datasets import generate
    from edgekit.passes import PassContext

    info = model_info(MODEL)
    cfg = TrainConfig(epochs=size["epochs"], **TRAIN)
    key_src = {"model": MODEL, "args": MODEL_ARGS, "train": size["train"], "seed": SEED, "cfg": cfg.model_dump(), "data": "shapes_vqa-v1", "arch": "tiny_vlm-v3"}
    key = "tokens_vlm-" + hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    cached = (CACHE / "weights" / f"{key}.pt").is_file()
    data = None
    if not cached:
        log(f"  training {MODEL} on {size['train']} shapes_vqa questions, {size['epochs']} epochs (cached afterwards)")
        train = generate("shapes_vqa", size["train"], SEED, info.inputs, info.dims)
        data = _Data(train.arrays, train.labels)
    torch.manual_seed(0)
    module = create_model(MODEL, **MODEL_ARGS).eval()
    artifact = Artifact(format="torch", inputs=info.inputs, task=info.task, builder={"kind": "zoo", "name": MODEL, "args": MODEL_ARGS}, module=module)
    ctx = PassContext(workdir=CACHE, data=data or _Data({}, np.zeros(0, np.int64)), seed=SEED, cache_dir=CACHE, key=key, log=log)
    trained = TrainSupervised(cfg).run(artifact, ctx)
    return trained.module.eval(), ctx.metrics["train"]


def _accuracy(module, data, batch: int = 200) -> dict[str, float]:
    import torch

    from edgekit.models.shapes_vqa import VOCAB

    preds = []
    with torch.no_grad():
        for i in range(0, len(data.labels), batch):
            px = torch.from_numpy(data.arrays["pixel_values"][i : i + batch])
            ids = torch.from_numpy(data.arrays["input_ids"][i : i + batch])
            preds.append(module(px, ids).argmax(1).numpy())
    right = np.concatenate(preds) == data.labels
    out = {name: float(right[data.groups == g].mean()) for g, name in enumerate(data.group_names)} | {"all": float(right.mean())}
    # a localization answer names the quadrant, so it tells which half of the image holds the target
    top = np.isin(data.labels, [VOCAB["top-left"], VOCAB["top-right"]])
    loc = data.groups == data.group_names.index("localization")
    return out | {"localization_top": float(right[loc & top].mean()), "localization_bottom": float(right[loc & ~top].mean())}


def _rows(kept: np.ndarray, cols: int, rows: int) -> dict[str, float]:
    r = kept // cols
    return {"mean_row": float(r.mean()), "top_half": float((r < rows / 2).mean())}


def evaluate_methods(model, data, kept_samples: int = 300) -> dict[str, dict[str, Any]]:
    """Accuracy, LM MACs and kept rows for each method on ``data`` (a shapes_vqa SynthData)."""
    from edgekit.compress.tokens.accounting import token_flops
    from edgekit.compress.tokens.feather import apply_feather, kept_positions

    rows, cols = model.image_grid
    feed1 = {k: v[:1] for k, v in data.arrays.items()}
    some = {k: v[:kept_samples] for k, v in data.arrays.items()}
    out: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        module = model if method == "none" else apply_feather(copy.deepcopy(model), method=method)
        flops = token_flops(module, feed1)
        res: dict[str, Any] = {"accuracy": _accuracy(module, data), "block_macs": flops["block_macs"], "tokens": [r["tokens"] for r in flops["layers"]]}
        if method != "none":
            kept = {layer: k.numpy() for layer, k in kept_positions(module, some).items()}
            layers = sorted(kept)
            res["stages"] = [{"layer": lay, "keep": int(kept[lay].shape[1])} for lay in layers]
            res["first_stage"] = _rows(kept[layers[0]], cols, rows)
            res["last_stage"] = _rows(kept[layers[-1]], cols, rows)
        out[method] = res
    return out


def score_bias(model, data, samples: int = 300) -> dict[str, dict[str, float]]:
    """Where the raw criterion looks: the rows of the top 25% image tokens by the last query's attention, with and without RoPE, per block."""
    import torch

    rows, cols = model.image_grid
    n = model.num_image_tokens
    px = torch.from_numpy(data.arrays["pixel_values"][:samples])
    ids = torch.from_numpy(data.arrays["input_ids"][:samples])
    found: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        h = torch.cat([model.encode_image(px), model.embed(ids)], dim=1)
        pos = torch.arange(h.shape[1]).unsqueeze(0).expand(h.shape[0], -1)
        for i, block in enumerate(model.blocks):
            for rope in (True, False):
                top = block.image_scores(h, pos, n, rope).topk(n // 4, dim=1).indices.numpy()
                found[f"block {i} {'rope' if rope else 'no rope'}"] = _rows(top, cols, rows)
            h = block(h, pos)
    return found


def vlm_section(quick: bool) -> tuple[str, dict]:
    """Markdown and a json-able dict of the VLM comparison (quick: smaller training and eval sets)."""
    import torch

    from edgekit.models import model_info
    from edgekit.models.datasets import generate
    from edgekit.models.shapes_vqa import QUADRANTS

    size = QUICK if quick else FULL
    started = time.perf_counter()
    model, train_metrics = train_vlm(size)
    info = model_info(MODEL)
    data = generate("shapes_vqa", size["eval"], EVAL_SEED, info.inputs, info.dims)
    results = evaluate_methods(model, data)
    bias = score_bias(model, data)
    rows, cols = model.image_grid
    dense_macs = results["none"]["block_macs"]
    base_loc = results["fastv"]["accuracy"]["localization"]
    lines = [
        (
            f"Model `zoo:{MODEL}` ({sum(p.numel() for p in model.parameters()) / 1e3:.0f} k parameters; {rows}x{cols} image tokens + 8 question tokens; "
            f"LM of {len(model.blocks)} RoPE blocks), trained by `train.supervised` on {size['train']} `synth:shapes_vqa` questions for {size['epochs']} epochs; "
            f"evaluated on {size['eval']} held-out questions (half localization: chance 25%). Equal compute: FastV keeps as many image tokens "
            "per pruned block on average as FEATHER's two stages. Rows: 0 = top, "
            f"{rows - 1} = bottom (uniform = {(rows - 1) / 2:.1f}); top half = share of kept tokens in rows 0-{rows // 2 - 1}."
        ),
        "",
        "| method | image tokens per LM block | LM MACs | localization | target in top / bottom half | other | kept rows, first stage: mean / top half | after last stage |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method, r in results.items():
        acc = r["accuracy"]
        first = f"{r['first_stage']['mean_row']:.2f} / {r['first_stage']['top_half']:.0%}" if "first_stage" in r else "-"
        last = f"{r['last_stage']['mean_row']:.2f} / {r['last_stage']['top_half']:.0%}" if "last_stage" in r else "-"
        image = " ".join(str(t - 8) for t in r["tokens"])
        macs = f"{r['block_macs'] / 1e6:.2f} M ({r['block_macs'] / dense_macs:.0%})"
        halves = f"{acc['localization_top']:.1%} / {acc['localization_bottom']:.1%}"
        lines.append(f"| {method} | {image} | {macs} | {acc['localization']:.1%} | {halves} | {acc['other']:.1%} | {first} | {last} |")
    ratio = results["feather"]["accuracy"]["localization"] / base_loc if base_loc else float("inf")
    chance = 1 / len(QUADRANTS)
    above = {m: 100 * (results[m]["accuracy"]["localization"] - chance) for m in ("feather", "fastv")}
    above_ratio = above["feather"] / above["fastv"] if above["fastv"] > 0 else float("inf")
    lines += [
        "",
        f"FEATHER / FastV localization accuracy: {ratio:.2f}x (paper, RefCOCO: 43.4 / 7.6 = 5.7x). "
        f"Above the {chance:.0%} a {len(QUADRANTS)}-way answer gets by chance: {above['feather']:.1f} / {above['fastv']:.1f} points = {above_ratio:.2f}x "
        f"(RefCOCO's box accuracy has almost no chance floor; here no ratio of accuracies can pass {len(QUADRANTS)}x).",
        "",
        "Where the raw criterion looks (top 25% image tokens by the last token's attention, mean row / top-half share):",
        "",
        "| block | with RoPE | without RoPE |",
        "| ---: | ---: | ---: |",
    ]
    for i in range(len(model.blocks)):
        a, b = bias[f"block {i} rope"], bias[f"block {i} no rope"]
        lines.append(f"| {i} | {a['mean_row']:.2f} / {a['top_half']:.0%} | {b['mean_row']:.2f} / {b['top_half']:.0%} |")
    result = {
        "model": MODEL,
        "model_args": MODEL_ARGS,
        "size": size,
        "train": train_metrics,
        "threads": torch.get_num_threads(),
        "methods": results,
        "feather_over_fastv_localization": ratio,
        "feather_over_fastv_localization_above_chance": above_ratio,
        "score_bias": bias,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return "\n".join(lines) + "\n", result
