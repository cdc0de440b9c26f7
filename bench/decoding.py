"""Speculative decoding (issue 11): each drafter against plain greedy decoding, same model, same prompts.

Models (bench/decoding_models.py; trained once on text the project ships, then cached):

  prose      DecoderLM (Llama layout, ~2.4 M params) on English sentences from CPython's docs
  code       the same architecture on Python source of the interpreter's standard library
  BlockFFN   the TinyLM of bench/blockffn_e2e.py (prose), its FFNs on edgekit's sparse kernels
             (runtimes/blockffn_runtime.attach_kernels, chunks of 8: a verification pass of up
             to 8 tokens reads each expert once; its ngram and aded drafts are capped at 7
             tokens, so the pending token and the draft fill one chunk)

Per model and runtime (torch; ONNX Runtime through the exported verifier when
runtimes/decoding/ort_target.py is there), at batch 1 on THREADS threads, PROMPTS prompts of
PROMPT_TOKENS bytes from the held-out end of the model's corpus, NEW_TOKENS new bytes each:
plain greedy (``generate(target, None, ...)``) and ``generate(target, drafter, ...)`` for the
drafters ngram (prompt lookup), aded (adaptive tri-gram draft trees, from the output alone),
aded+corpus (the same table seeded with the model's training text; "4-gram" with order=4;
"whole" feeds the untrimmed tree, where the others are cut to the size worth its measured pass
cost by runtimes/decoding/budget.py), swift (the model with layers skipped drafts for itself;
torch only) and head (a Chimera-style head trained on the model's corpus, cached). The comparison is edgekit.runtimes.decoding.compare.compare_drafters:
every round decodes every prompt once per variant in a rotating order; speed-ups are ratios
within a round, medians over ROUNDS rounds; a fresh drafter state per prompt (no drafter sees
an earlier run of the same prompt). Columns: speed-up over plain, tokens/s, tokens produced per
verification pass (accepted draft tokens + 1), the drafter's share of the time, and whether
every prompt's output equals plain greedy's token for token.

Small greedy byte LMs repeat themselves, which is what n-gram drafters feed on; each model's
line gives the share of plain greedy's generated 8-grams that already occurred earlier in
prompt + output, so the speed-ups can be read against it.

Run: python bench/decoding.py  (writes bench/results/decoding.md and decoding.json; the first
run trains the two DecoderLMs, two heads and the BlockFFN model, ~1 h on 2 cores, later runs
load them). BENCH_QUICK=1: one round, one prompt, 32 new tokens, output to a temp folder (a
smoke run; its numbers mean nothing).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgekit import fsio
from edgekit.errors import UserError
from edgekit.machine import cpu_ticks, machine_info, versions
from edgekit.runtimes.blockffn_runtime import attach_kernels
from edgekit.runtimes.decoding import generate
from edgekit.runtimes.decoding.compare import PLAIN, compare_drafters
from edgekit.runtimes.decoding.drafters import make_drafter
from edgekit.runtimes.decoding.target import TorchTarget

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decoding_models as dm  # noqa: E402  (bench/ is not a package)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
QUICK = os.environ.get("BENCH_QUICK") == "1"
PROMPTS, PROMPT_TOKENS, NEW_TOKENS, ROUNDS = (1, 128, 32, 1) if QUICK else (8, 128, 128, 5)
THREADS = 2
CHUNK = 8  # tokens per BlockFFN kernel chunk
SEED = 0
# ADED seeded with the model's training text: as the paper's tri-gram, with a 4-gram table, and
# the tri-gram feeding its whole tree (no draft budget)
CORPUS_VARIANTS = {"aded+corpus": {}, "aded+corpus 4-gram": {"order": 4}, "aded+corpus whole": {"budget": False}}
DRAFTERS = ("ngram", "aded", *CORPUS_VARIANTS, "swift", "head")
BLOCKFFN_DRAFTERS = ("ngram", "aded", *CORPUS_VARIANTS)
TRAINING_FREE = ("ngram", "aded", *CORPUS_VARIANTS, "swift")
OUTPUT_ONLY = ("ngram", "aded", "swift")  # training-free and without a corpus: only prompt + output
TARGETS = {"prose": 1.5, "code": 2.0}  # issue 11: best training-free drafter's speed-up, identical greedy output
REPEAT_N = 8  # n of the repetition statistic
HEAD = {"steps": 400, "depth": 4, "seed": 0}  # train_head settings (part of the head's cache key)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- draft heads ----------------------------------------------------------------------------


def head_weights(name: str, model, tokens: np.ndarray, info: dict[str, Any]) -> Path:
    """The draft head of a corpus model, trained on the model's training part and cached as .npz
    beside the model; the key covers the model's weights file, HEAD and the head code itself."""
    from edgekit.runtimes.decoding.drafters import head

    code = hashlib.sha256(Path(head.__file__).read_bytes()).hexdigest()
    key = hashlib.sha256(json.dumps([info["weights"], HEAD, code], sort_keys=True).encode()).hexdigest()[:16]
    path = dm.CACHE / f"head_{name}_{key}.npz"
    if path.is_file():
        return path
    log(f"[{name}] training a draft head ({HEAD['steps']} steps)")
    torch.set_num_threads(dm.TRAIN_THREADS)
    started = time.perf_counter()
    weights = head.train_head(model, dm.split(tokens)[0], steps=HEAD["steps"], depth=HEAD["depth"],
                              seed=HEAD["seed"], log=lambda m: log(f"[{name} head] {m}"))
    torch.set_num_threads(THREADS)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights.save(path)  # atomic
    log(f"[{name}] draft head trained in {time.perf_counter() - started:.0f} s: {path}")
    return path


# -- measurement ----------------------------------------------------------------------------


def repetition(prompt: list[int], out: list[int], n: int = REPEAT_N) -> tuple[int, int]:
    """(generated n-grams that occurred earlier in prompt + output, generated n-grams); an n-gram is
    generated if it ends in the output."""
    seq = [*prompt, *out]
    seen = {tuple(seq[i : i + n]) for i in range(len(prompt) - n + 1)}
    repeated = total = 0
    for i in range(max(0, len(prompt) - n + 1), len(seq) - n + 1):
        gram = tuple(seq[i : i + n])
        repeated += gram in seen
        total += 1
        seen.add(gram)
    return repeated, total


def factories(target, names: tuple[str, ...], corpus: np.ndarray, head_path: Path | None,
              options: dict[str, dict[str, Any]] | None = None) -> tuple[dict[str, Callable], dict[str, str]]:
    """Drafter makers by variant name, and the variants that cannot run on this target (with why).
    Every drafter resets in ``start``, so one instance serves all prompts (aded+corpus counts its
    corpus once). ``options``: settings by drafter name (e.g. a draft sized to one kernel chunk)."""
    made, skipped = {}, {}
    options = options or {}
    for name in names:
        try:
            if name in CORPUS_VARIANTS:
                d = make_drafter("aded", target, corpus=dm.split(corpus)[0], **{**options.get("aded", {}), **CORPUS_VARIANTS[name]})
            elif name == "head":
                if head_path is None:
                    raise UserError("no head trained for this model")
                d = make_drafter("head", target, weights=head_path)
            else:
                d = make_drafter(name, target, **options.get(name, {}))
        except UserError as e:
            skipped[name] = str(e)
            continue
        made[name] = lambda d=d: d
    return made, skipped


def measure(label: str, runtime: str, target, prompts: list[list[int]], makers: dict[str, Callable], skipped: dict[str, str]) -> dict[str, Any]:
    """Plain greedy once per prompt (warm-up and the repetition statistic), one warm-up run per
    drafter, then compare_drafters."""
    log(f"[{label} / {runtime}] warm-up")
    plain = [generate(target, None, p, NEW_TOKENS).tokens for p in prompts]
    for make in makers.values():
        generate(target, make(), prompts[0], NEW_TOKENS)
    rep = np.sum([repetition(p, o) for p, o in zip(prompts, plain)], axis=0)
    log(f"[{label} / {runtime}] {ROUNDS} rounds of {1 + len(makers)} variants x {len(prompts)} prompts")
    rows = compare_drafters(target, prompts, makers, NEW_TOKENS, rounds=ROUNDS)
    for r in rows:
        log(f"  {r['drafter']:<12} {r['speedup']:.2f}x  {r['tokens_per_s']:7.1f} tok/s  {r['tokens_per_pass']:.2f} tok/pass  exact {r['exact']}")
    return {"model": label, "runtime": runtime, "rows": rows, "skipped": skipped,
            "repeated_8grams": round(float(rep[0] / rep[1]), 4) if rep[1] else None,
            "sample": "".join(chr(t) if 32 <= t < 127 or t == 10 else "?" for t in plain[0][:160])}


def ort_target(model, folder: Path) -> tuple[Any, str | None]:
    """The model as an ONNX Runtime target (the exported verifier), or None and why not."""
    try:
        from edgekit.export.decoding_onnx import export_verifier
        from edgekit.runtimes.decoding.ort_target import OrtTarget
    except ImportError as e:  # the ONNX Runtime target is not in this checkout yet
        return None, f"not measured: {e.name} is missing"
    export_verifier(model, folder)
    return OrtTarget.load(folder, threads=THREADS), None


class CpuShare:
    """The share of all CPUs that other processes used while this one ran."""

    def __init__(self):
        self.start = cpu_ticks()

    def others(self) -> float | None:
        end = cpu_ticks()
        if self.start is None or end is None or end[1] <= self.start[1]:
            return None
        busy, total, ours = (e - s for e, s in zip(end, self.start))
        return max(0.0, (busy - ours) / total)


def run() -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    started, cpu = time.perf_counter(), CpuShare()
    cases, models = [], {}
    with tempfile.TemporaryDirectory(prefix="edgekit_decoding_") as scratch:
        for name, make_model, tokens in (("prose", dm.prose_model, dm.prose_tokens()), ("code", dm.code_model, dm.code_tokens())):
            model, info = make_model()
            models[name] = {k: v for k, v in info.items() if k != "train"}
            head_path = head_weights(name, model, tokens, info)
            torch.set_num_threads(THREADS)
            prompts = [p.tolist() for p in dm.prompts(tokens, PROMPTS, PROMPT_TOKENS, SEED)]
            target = TorchTarget(model)
            cases.append(measure(name, "torch", target, prompts, *factories(target, DRAFTERS, tokens, head_path)))
            ort, why = ort_target(model, Path(scratch) / name)
            if ort is None:
                cases.append({"model": name, "runtime": "onnxruntime", "not_measured": why})
            else:
                cases.append(measure(name, "onnxruntime", ort, prompts, *factories(ort, DRAFTERS, tokens, head_path)))
    # BlockFFN: the sparse model with every FFN on the kernels, chunks of 8 tokens
    sparse, metrics = dm.blockffn_model()
    torch.set_num_threads(THREADS)
    sparse = copy.deepcopy(sparse)
    attach_kernels(sparse, chunk=CHUNK, threads=THREADS)
    models["BlockFFN"] = {"params": sum(p.numel() for p in sparse.parameters()), "experts": metrics.get("experts"),
                          "tls": (metrics.get("after") or {}).get("tls"), "cls_8": (metrics.get("after") or {}).get("cls_8")}
    target = TorchTarget(sparse)
    prompts = [p.tolist() for p in dm.prompts(dm.prose_tokens(), PROMPTS, PROMPT_TOKENS, SEED)]
    # chunk verification: the pending token and a draft of CHUNK - 1 fill one kernel chunk, so a pass
    # reads each active expert once
    fit = {"aded": {"size": CHUNK - 1}, "ngram": {"length": CHUNK - 1}}
    cases.append(measure("BlockFFN", f"torch + sparse kernels (chunk {CHUNK})", target, prompts,
                         *factories(target, BLOCKFFN_DRAFTERS, dm.prose_tokens(), None, fit)))
    return {
        "date": datetime.now(UTC).date().isoformat(),
        "quick": QUICK,
        "settings": {"prompts": PROMPTS, "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "rounds": ROUNDS,
                     "threads": THREADS, "seed": SEED, "head": HEAD, "repeat_n": REPEAT_N},
        "machine": machine_info(),
        "versions": versions(),
        "models": models,
        "cases": cases,
        "targets": targets(cases),
        "other_cpu_share": cpu.others(),
        "minutes": round((time.perf_counter() - started) / 60, 1),
    }


def targets(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per corpus model and runtime: the best training-free drafter whose output is exact, against the
    target; and the best of those that use no corpus (prompt + output alone)."""
    out = []
    for c in cases:
        if c["model"] not in TARGETS or "rows" not in c:
            continue
        exact = [r for r in c["rows"] if r["exact"]]
        best = max((r for r in exact if r["drafter"] in TRAINING_FREE), key=lambda r: r["speedup"], default=None)
        alone = max((r for r in exact if r["drafter"] in OUTPUT_ONLY), key=lambda r: r["speedup"], default=None)
        out.append({"model": c["model"], "runtime": c["runtime"], "target": TARGETS[c["model"]],
                    "best": best and best["drafter"], "speedup": best and round(best["speedup"], 3),
                    "met": bool(best and best["speedup"] >= TARGETS[c["model"]]),
                    "best_output_only": alone and alone["drafter"], "speedup_output_only": alone and round(alone["speedup"], 3)})
    return out


# -- report ---------------------------------------------------------------------------------


def markdown(res: dict[str, Any]) -> str:
    m, v, s = res["machine"], res["versions"], res["settings"]
    other = res["other_cpu_share"]
    lines = [
        "# Speculative decoding: drafters against plain greedy decoding",
        "",
        (f"Machine: {m.get('cpu')} ({m.get('cores')} cores, {', '.join(m.get('flags', []))}); torch {v.get('torch')}, "
         f"onnxruntime {v.get('onnxruntime')}, numpy {v.get('numpy')}, edgekit {v.get('edgekit')}; {s['threads']} threads; "
         f"{res['date']}. Batch 1, greedy; {s['prompts']} prompts of {s['prompt_tokens']} bytes from the held-out end of "
         f"each model's corpus, {s['new_tokens']} new bytes each; {s['rounds']} rounds, every variant decoding every prompt "
         "once per round in a rotating order; speed-ups are ratios within a round, medians over rounds (tokens/s too is a "
         f"median). Whole run {res['minutes']:.1f} min"
         + (f"; other processes used {other:.0%} of the CPUs meanwhile" if other is not None else "")
         + ". Regenerate: `python bench/decoding.py`."),
        "",
    ]
    if res["quick"]:
        lines += ["**Quick run (BENCH_QUICK=1): one round, one prompt, few tokens; the numbers mean nothing.**", ""]
    lines += [
        ("Drafters: **ngram** looks the context's last n-gram (n <= 4) up earlier in prompt + output and drafts what "
         "followed; **aded** keeps an adaptive tri-gram table of prompt + output and searches it into a draft tree; "
         "**aded+corpus** seeds that table with the model's training text (**4-gram**: a 4-gram table backing off "
         "to shorter contexts); ngram, aded and head feed only as many of their best-scored nodes as pay for their "
         "measured pass cost on the target (runtimes/decoding/budget.py), and **aded+corpus whole** feeds every "
         "drafted node for comparison; **swift** drafts with the model itself, "
         "a searched set of its layers skipped (torch only); **head** is a small draft head over the model's final hidden "
         f"state, trained ({s['head']['steps']} steps) on the model's training text to predict the model's own greedy "
         "tokens. Tokens per pass = tokens produced per verification pass (accepted draft tokens + 1; plain: 1). "
         "Draft share = the drafter's share of the decoding time. Exact = every prompt's output equals plain greedy's."),
        "",
        "## Targets (issue 11)",
        "",
    ]
    for t in res["targets"]:
        got = f"{t['best']} {t['speedup']:.2f}x" if t["best"] else "no exact training-free drafter"
        alone = f"{t['best_output_only']} {t['speedup_output_only']:.2f}x" if t["best_output_only"] else "none exact"
        lines.append(f"- {t['model']} ({t['runtime']}): best training-free drafter with identical greedy output: {got}; "
                     f"target >= {t['target']:g}x: **{'met' if t['met'] else 'not met'}** (without a corpus, from prompt + "
                     f"output alone: {alone}).")
    lines.append("")
    for c in res["cases"]:
        lines += case_section(c, res["models"])
    return "\n".join(lines) + "\n"


def case_section(c: dict[str, Any], models: dict[str, Any]) -> list[str]:
    lines = [f"## {c['model']} on {c['runtime']}", ""]
    if "rows" not in c:
        return lines + [c["not_measured"], ""]
    info = models[c["model"]]
    if c["model"] == "BlockFFN":
        lines.append(f"TinyLM with BlockFFN FFNs ({info.get('params', 0) / 1e6:.1f} M params, {info.get('experts')} experts; "
                     f"token-level sparsity {info.get('tls') or 0:.0%}, 8-token chunk sparsity {info.get('cls_8') or 0:.0%}), "
                     "prose prompts.")
    else:
        lines.append(f"DecoderLM {info['params'] / 1e6:.2f} M params, {info['steps']} training steps, held-out loss "
                     f"{info['heldout_loss']:.3f} nats/byte.")
    lines += [
        "",
        (f"Plain greedy output repeats itself: {c['repeated_8grams']:.0%} of its generated {REPEAT_N}-grams already occurred "
         "earlier in prompt + output."),
        "",
        "| Drafter | **speed-up over plain** | tokens/s | tokens per pass | draft share | exact |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in c["rows"]:
        exact = "yes" if r["exact"] else f"NO ({r['prompts_differing']} of {PROMPTS} prompts differ)"
        speed = "1.00x" if r["drafter"] == PLAIN else f"**{r['speedup']:.2f}x**"
        lines.append(f"| {r['drafter']} | {speed} | {r['tokens_per_s']:,.0f} | {r['tokens_per_pass']:.2f} | "
                     f"{r['draft_share']:.0%} | {exact} |")
    for name, why in c["skipped"].items():
        lines.append(f"| {name} | not run: {why} | | | | |")
    return lines + [""]


def main() -> None:
    out_dir = Path(tempfile.gettempdir()) / "decoding_quick" if QUICK else RESULTS
    res = run()
    fsio.write_text(out_dir / "decoding.md", markdown(res))
    fsio.write_json(out_dir / "decoding.json", res)
    log(f"wrote {out_dir / 'decoding.md'} and decoding.json")


if __name__ == "__main__":
    main()
