"""Encoder-decoder distillation (issue 9): decoder-only teacher vs encoder-decoder student on ONNX Runtime.

Two sections, both timed by the same generation loop (``runtimes/generation.py``)
on ONNX Runtime CPU, the teacher with its KV cache, the student's encoder once per
input and its decoder with a KV cache:

- trained: examples/recipes/encdec_event_log.yaml run by edgekit (the teacher trained
  on the generated event_log task, the student distilled from it at equal parameters,
  both exported); task quality of both exports on the recipe's eval pairs.
- size class: the same architectures at a small-SLM width (512, 12 layers, 32k
  vocabulary, random weights: latency only), where the weight matrices rather
  than per-op overhead set the cost.

For source lengths 128 / 512 / 1024 and 32 new tokens (EOS ignored): median
time to the first token and tokens per second (32 x batch / total time) at batch
1 and 8. Teacher and student run in turns on the same input, and the cut and
ratios (student against teacher) are medians of the per-turn ratios, so a drift
in the machine's speed does not land on one of them. Run: python
bench/encdec.py (writes bench/results/encdec.md and encdec.json; the recipe's
steps are cached under bench/.cache). --quick: short settings into a temporary
folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
RECIPE = ROOT / "examples" / "recipes" / "encdec_event_log.yaml"


def run_recipe(cache: Path, quick: bool) -> Path:
    """Run the example recipe (finished steps reused); its run folder."""
    import os

    run = cache / ("encdec-run-quick" if quick else "encdec-run")
    cmd = [sys.executable, "-m", "edgekit", "compress", str(RECIPE), "--run-dir", str(run), "--resume", "--quiet"]
    if quick:
        cmd += ["--set", "compress[0].train.seq2seq.steps=20", "--set", "compress[1].distill.encdec.steps=20", "--set", "data.source=synth:event_log:400"]
    subprocess.run(cmd, check=True, env={**os.environ, "EDGEKIT_CACHE": str(cache / "edgekit-cache")})
    return run


def exports_of(run: Path) -> dict[str, dict]:
    """The teacher's and the student's export steps from a run's report: folder, files, meta, accuracy."""
    from edgekit.artifact import Artifact

    report = json.loads((run / "report.json").read_text())
    found = {}
    for step in report["steps"]:
        if step.get("format") != "onnx":
            continue
        art = Artifact.load(run / "steps" / step["id"] / "artifact")
        kind = art.meta["generation"]["kind"]
        role = "teacher" if kind == "decoder" else "student"
        acc = step["metrics"].get("accuracy") or {}
        found[role] = {"artifact": art, "exact_match": acc.get("value"), "token_accuracy": acc.get("token_accuracy"), "params": step["metrics"].get("params")}
    distill = next((s["metrics"]["distill"] for s in report["steps"] if "distill" in s.get("metrics", {})), {})
    found["distill"] = distill
    return found


def time_pair(generators: dict, vocab: int, lengths, batches, new_tokens: int, repeats: int) -> list[dict]:
    """Teacher and student on the same inputs, timed in turns; cut and ratios are medians of per-repeat ratios."""
    from edgekit.runtimes.generation import paired_generation

    rows = []
    rng = np.random.default_rng(0)
    for length in lengths:
        for batch in batches:
            ids = rng.integers(4, vocab, size=(batch, length), dtype=np.int64)
            row = {"source_tokens": length, "batch": batch}
            masks = {role: (np.ones_like(ids) if gen.kind == "encdec" else None) for role, gen in generators.items()}
            stats = paired_generation(generators, ids, new_tokens, masks, repeats=repeats, warmup=1)  # teacher first: the baseline
            for role, r in stats.items():
                row[role] = {k: r[k] for k in ("first_token_ms", "total_ms", "tokens_per_s", "decode_tokens_per_s")}
            paired = stats["student"]["vs_first"]
            row["first_token_cut"] = 1 - paired["first_token"]
            row["throughput_ratio"] = 1 / paired["total"]
            row["decode_ratio"] = 1 / paired["decode"]
            rows.append(row)
            print(f"  src {length:5d} batch {batch}: first-token cut {row['first_token_cut']:.0%}, throughput {row['throughput_ratio']:.2f}x, "
                  f"decoding {row['decode_ratio']:.2f}x", flush=True)
    return rows


def size_class_pair(folder: Path, quick: bool) -> tuple[dict, dict]:
    """Random-weight teacher and student at a small-SLM size, exported for generation."""
    import torch

    from edgekit.export.encdec_onnx import export_generation, generation_meta
    from edgekit.models.encdec import DecoderLM, EncoderDecoderLM, LMConfig, count_params, student_config

    cfg = LMConfig(vocab=32000, dim=512, heads=8, kv_heads=2, ffn=1408, layers=12) if not quick else LMConfig(vocab=2000, dim=128, heads=4, kv_heads=2, ffn=352, layers=6)
    torch.manual_seed(0)
    teacher = DecoderLM(cfg).eval()
    student = EncoderDecoderLM(student_config(cfg)).eval()
    info = {"teacher_params": count_params(teacher), "student_params": count_params(student), "config": cfg.__dict__,
            "student_layers": [student.cfg.enc_layers, student.cfg.dec_layers], "student_ffn": student.cfg.ffn}
    out = {}
    for role, model in (("teacher", teacher), ("student", student)):
        files = export_generation(model, folder / role)
        out[role] = (folder / role, files, generation_meta(model))
    return out, info


def render(result: dict) -> str:
    lines = ["# Encoder-decoder student vs decoder-only teacher (ONNX Runtime, KV cache)", "", result["header"], ""]
    trained = result.get("trained")
    if trained:
        d = trained["distill"]
        lines += ["## Trained on the event_log task (examples/recipes/encdec_event_log.yaml)", ""]
        lines += ["| Model | Layers | Params | Exact match | Token accuracy |", "| --- | --- | ---: | ---: | ---: |"]
        lines.append(f"| teacher (decoder-only) | {d.get('teacher_layers')} | {d.get('teacher_params', 0) / 1e6:.2f} M | {_pct(trained['teacher_exact_match'])} | {_pct(trained['teacher_token_accuracy'])} |")
        lines.append(f"| student (encoder-decoder) | {d.get('encoder_layers')} enc + {d.get('decoder_layers')} dec | {d.get('student_params', 0) / 1e6:.2f} M | {_pct(trained['student_exact_match'])} | {_pct(trained['student_token_accuracy'])} |")
        lines += ["", "Exact match: greedy answers of the ONNX exports on the recipe's eval pairs (whole answer right).", ""]
        lines += _timing_table(trained["rows"])
    size = result.get("size_class")
    if size:
        info = size["info"]
        lines += ["", f"## Small-SLM size class (random weights, latency only): width {info['config']['dim']}, {info['config']['layers']} layers, "
                  f"vocabulary {info['config']['vocab']}; student {info['student_layers'][0]} enc + {info['student_layers'][1]} dec, FFN {info['student_ffn']}; "
                  f"{info['teacher_params'] / 1e6:.1f} M vs {info['student_params'] / 1e6:.1f} M parameters", ""]
        lines += _timing_table(size["rows"])
        t_macs, s_macs, head = decode_macs(info)
        lines += ["", f"Per generated token the weight matmuls cost the teacher {t_macs / 1e6:.1f} M MACs and the student {s_macs / 1e6:.1f} M "
                  f"({t_macs / s_macs:.2f}x fewer), of which the output head over the {info['config']['vocab']:,}-token vocabulary is "
                  f"{head / 1e6:.1f} M in both: with a vocabulary this large the shallow decoder's saving is capped near that ratio."]
    lines += ["", "First token: from the call to the first generated token (teacher: prefill of the whole source; student: encoder, "
              "cross-attention keys/values and one decoder step). Tokens/s: batch x 32 new tokens over the whole generation, "
              "prefill included. Decoding tokens/s: the 31 tokens after the first over the time after it (the source already read). "
              "Cut and ratios: student against teacher on the same input, the two run in turns; medians of the per-turn ratios "
              f"({result.get('repeats', '?')} turns; {result.get('size_class_repeats', '?')} at the small-SLM size)."]
    return "\n".join(lines) + "\n"


def decode_macs(info: dict) -> tuple[int, int, int]:
    """Weight-matmul MACs per generated token (attention over the cache left out): teacher, student, and the output head."""
    c = info["config"]
    hd = c["head_dim"] or c["dim"] // c["heads"]
    self_attn = c["dim"] * hd * (2 * c["heads"] + 2 * c["kv_heads"])
    cross_q_o = 2 * c["dim"] * hd * c["heads"]  # cross keys/values are computed once per input, not per token
    head = c["dim"] * c["vocab"]
    teacher = c["layers"] * (self_attn + 3 * c["dim"] * c["ffn"]) + head
    student = info["student_layers"][1] * (self_attn + cross_q_o + 3 * c["dim"] * info["student_ffn"]) + head
    return teacher, student, head


def _timing_table(rows: list[dict]) -> list[str]:
    out = ["| Source tokens | Batch | First token ms (teacher / student) | First-token cut | Tokens/s (teacher / student) | Throughput ratio | "
           "Decoding tokens/s (teacher / student) | Decoding ratio |",
           "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        t, s = r["teacher"], r["student"]
        out.append(f"| {r['source_tokens']} | {r['batch']} | {t['first_token_ms']:.1f} / {s['first_token_ms']:.1f} | {r['first_token_cut']:.0%} | "
                   f"{t['tokens_per_s']:.0f} / {s['tokens_per_s']:.0f} | {r['throughput_ratio']:.2f}x | "
                   f"{t['decode_tokens_per_s']:.0f} / {s['decode_tokens_per_s']:.0f} | {r['decode_ratio']:.2f}x |")
    return out


def _pct(v) -> str:
    return f"{100 * v:.2f}%" if isinstance(v, (int, float)) else "—"


def header(threads: int) -> str:
    from edgekit.machine import machine_info, versions

    m, v = machine_info(), versions()
    return (f"Machine: {m.get('cpu')} ({m.get('cores')} cores); onnxruntime {v.get('onnxruntime')}, torch {v.get('torch')}; "
            f"ONNX Runtime intra-op threads {threads}; {datetime.now(UTC).date()}. Regenerate: `python bench/encdec.py`.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short settings, output to a temporary folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--render", action="store_true", help="rewrite encdec.md from the last encdec.json without measuring")
    args = ap.parse_args()
    from edgekit import fsio

    if args.render:
        fsio.write_text(RESULTS / "encdec.md", render(json.loads((RESULTS / "encdec.json").read_text())))
        return
    from edgekit.runtimes.generation import OrtGenerator

    out = Path(tempfile.mkdtemp(prefix="encdec-bench-")) if args.quick else RESULTS
    cache = Path(tempfile.mkdtemp(prefix="encdec-cache-")) if args.quick else HERE / ".cache"
    lengths = (128, 512) if args.quick else (128, 512, 1024)
    batches = (1, 8)
    repeats = 2 if args.quick else 9
    result: dict = {"header": header(args.threads), "repeats": repeats, "size_class_repeats": min(repeats, 5)}

    print("trained pair: running examples/recipes/encdec_event_log.yaml", flush=True)
    found = exports_of(run_recipe(cache, args.quick))
    gens = {role: OrtGenerator.load(found[role]["artifact"].folder, found[role]["artifact"].files, found[role]["artifact"].meta["generation"], threads=args.threads)
            for role in ("teacher", "student")}
    vocab = int(found["teacher"]["artifact"].meta["generation"]["vocab"])
    result["trained"] = {
        "distill": found["distill"],
        **{f"{role}_{k}": found[role][k] for role in ("teacher", "student") for k in ("exact_match", "token_accuracy", "params")},
        "rows": time_pair(gens, vocab, lengths, batches, 32, repeats),
    }

    print("size class: random-weight pair", flush=True)
    with tempfile.TemporaryDirectory(prefix="encdec-size-") as tmp:
        pair, info = size_class_pair(Path(tmp), args.quick)
        gens = {role: OrtGenerator.load(folder, files, meta, threads=args.threads) for role, (folder, files, meta) in pair.items()}
        # five repeats: a batch-8 prefill of 1024 tokens at this size takes seconds
        result["size_class"] = {"info": info, "rows": time_pair(gens, info["config"]["vocab"], lengths, batches, 32, result["size_class_repeats"])}

    from edgekit.machine import machine_info, versions

    fsio.write_text(out / "encdec.md", render(result))
    fsio.write_json(out / "encdec.json", {"machine": machine_info(), "versions": versions(), "threads": args.threads, **result})
    print(f"wrote {out / 'encdec.md'}")


if __name__ == "__main__":
    main()
