"""End-to-end greedy decoding of the small BlockFFN language model: dense vs sparse kernels.

The model is the one examples/recipes/blockffn_lm.yaml makes (tiny_lm_small trained on the
shipped text, its FFNs converted to BlockFFN and fine-tuned). Its compress steps run through
the pipeline in a cache folder; the trained weights are cached, so a rerun only loads them.
Then, in this process and on the same prompts, KV-cache greedy decoding of NEW_TOKENS bytes:

  dense          the model before conversion (torch, dense FFN)
  fallback       the BlockFFN model in torch, every expert computed (what ONNX export runs)
  kernels fp32   the BlockFFN model with every FFN on edgekit's sparse kernels (blockffn runtime)
  kernels int8   the same with int8 expert weights

Each variant decodes in its own block, blocks alternate over ROUNDS rounds; tokens/s medians,
speedups as ratios within a round. The sparse kernels' tokens are compared with the fallback's
(same weights; fp32 sums in another order can flip a near-tie argmax).

Imported by bench/blockffn.py, which puts the result under "End-to-end decoding".
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from edgekit.pipeline import Pipeline, default_cache_dir
from edgekit.progress import Reporter
from edgekit.recipe import recipe_from_dict

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "recipes" / "blockffn_lm.yaml"
PROMPT_TOKENS = 64
NEW_TOKENS = 128
PROMPTS = 4
ROUNDS = 5
THREADS = 2


def trained_models() -> tuple[Any, Any, dict[str, Any]]:
    """(dense module, BlockFFN module, the moe.blockffn metrics) from the example recipe's compress steps."""
    raw = yaml.safe_load(RECIPE.read_text())
    raw.pop("export", None)
    raw.pop("bench", None)
    raw["report"] = {"formats": ["json"]}
    recipe = recipe_from_dict(raw, base_dir=RECIPE.parent, origin=str(RECIPE))
    pipe = Pipeline(recipe, default_cache_dir() / "bench_blockffn" / "run", resume=True, reporter=Reporter(quiet=True))
    report = pipe.run()
    from edgekit.artifact import Artifact

    steps = {s["pass"]: s for s in report["steps"]}
    folder = pipe.run_dir / "steps"
    dense = Artifact.load(next(folder.glob("*train.lm")) / "artifact").torch_module().eval()
    sparse = Artifact.load(next(folder.glob("*moe.blockffn")) / "artifact").torch_module().eval()
    return dense, sparse, steps["moe.blockffn"]["metrics"].get("blockffn", {})


def prompts(data: bytes) -> torch.Tensor:
    """PROMPTS byte windows spread over the last part of the corpus (the recipe's eval side)."""
    tail = data[-len(data) // 10 :]
    starts = np.linspace(0, len(tail) - PROMPT_TOKENS - 1, PROMPTS).astype(int)
    return torch.tensor([list(tail[s : s + PROMPT_TOKENS]) for s in starts], dtype=torch.int64)


def decode_all(model, batch: torch.Tensor) -> tuple[list[list[int]], float]:
    """Greedy-decode every prompt (batch 1 each); the new tokens and the tokens per second."""
    out, start = [], time.perf_counter()
    with torch.inference_mode():
        for p in batch:
            out.append(model.generate(p[None], NEW_TOKENS)[0, PROMPT_TOKENS:].tolist())
    return out, len(batch) * NEW_TOKENS / (time.perf_counter() - start)


def end_to_end() -> dict[str, Any]:
    from edgekit.runtimes.blockffn_runtime import attach_kernels

    torch.set_num_threads(THREADS)
    dense, sparse, metrics = trained_models()
    variants = {"dense": dense, "fallback": sparse}
    for weights in ("fp32", "int8"):
        m = copy.deepcopy(sparse)
        attach_kernels(m, weights=weights, chunk=8, threads=THREADS)
        variants[f"kernels {weights}"] = m
    batch = prompts((RECIPE.parent / ".." / "data" / "python_docs_sentences.txt").resolve().read_bytes())
    tokens = {name: decode_all(m, batch[:1])[0] for name, m in variants.items()}  # warm-up (and the kernel build)
    speed: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(ROUNDS):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            tokens[name], tps = decode_all(variants[name], batch)
            speed[name].append(tps)
            time.sleep(0.05)
    ratios = {name: statistics.median(s / f for s, f in zip(speed[name], speed["fallback"])) for name in variants}
    over_dense = {name: statistics.median(s / d for s, d in zip(speed[name], speed["dense"])) for name in variants}
    ref = np.array(tokens["fallback"])
    after = metrics.get("after") or {}
    return {
        "model": "tiny_lm_small (examples/recipes/blockffn_lm.yaml)",
        "experts": metrics.get("experts"), "expert_size": metrics.get("expert_size"), "layers": metrics.get("layers"),
        "tls": after.get("tls"), "cls_8": after.get("cls_8"),
        "ppl_dense": (metrics.get("dense") or {}).get("ppl"), "ppl_blockffn": after.get("ppl"),
        "prompts": PROMPTS, "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "rounds": ROUNDS, "threads": THREADS,
        "tokens_per_s": {k: round(statistics.median(v), 1) for k, v in speed.items()},
        "speedup_vs_fallback": {k: round(v, 3) for k, v in ratios.items()},
        "speedup_vs_dense": {k: round(v, 3) for k, v in over_dense.items()},
        "same_tokens_as_fallback": {k: round(float((np.array(t) == ref).mean()), 4) for k, t in tokens.items()},
    }


def markdown(e: dict[str, Any]) -> str:
    lines = [
        f"{e['model']}: {e['layers']} BlockFFN layers of {e['experts']} experts x {e['expert_size']} neurons, TLS "
        f"{e['tls']:.1%}, 8-token CLS {e['cls_8']:.1%}, eval perplexity {e['ppl_dense']:.3f} dense -> {e['ppl_blockffn']:.3f}. "
        f"Greedy KV-cache decoding of {e['new_tokens']} bytes after {e['prompt_tokens']}-byte prompts, {e['prompts']} prompts "
        f"per block, {e['rounds']} alternating rounds, {e['threads']} threads; median tokens/s and ratios within a round.",
        "",
        "| Variant | tokens/s | vs BlockFFN in torch (every expert) | vs the dense model | same tokens as the torch BlockFFN |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, tps in e["tokens_per_s"].items():
        lines.append(f"| {name} | {tps:,.0f} | {e['speedup_vs_fallback'][name]:.2f}x | {e['speedup_vs_dense'][name]:.2f}x | "
                     f"{e['same_tokens_as_fallback'][name]:.1%} |")
    return "\n".join(lines)
