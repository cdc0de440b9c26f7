"""The encoder-decoder part of the report: what distill.encdec built and how it scored
against its teacher, and the generation timings of ONNX exports (time to the first
token, tokens per second) measured by the pipeline's generation bench."""

from __future__ import annotations

from typing import Any


def render_encdec_section(steps: list[dict[str, Any]]) -> list[str]:
    from edgekit.report import _num, _table, human_count

    lines: list[str] = []
    for step in steps:
        d = (step.get("metrics") or {}).get("distill")
        if not d:
            continue
        student, teacher = d.get("eval") or {}, d.get("teacher_eval") or {}
        lines += ["", f"## Encoder-decoder distillation ({step.get('id', '?')})", ""]
        lines += _table(
            ["Model", "Layers", "FFN", "Params", "Exact match", "Token accuracy"],
            [
                ["teacher (decoder-only)", d.get("teacher_layers"), d.get("teacher_ffn"),
                 human_count(d.get("teacher_params")), _pct(teacher.get("exact_match")), _pct(teacher.get("token_accuracy"))],
                ["student (encoder-decoder)", f"{d.get('encoder_layers')} enc + {d.get('decoder_layers')} dec", d.get("student_ffn"),
                 human_count(d.get("student_params")), _pct(student.get("exact_match")), _pct(student.get("token_accuracy"))],
            ],
            right={2, 3, 4, 5},
        )
        loss = f"loss {d['final_loss']:.4f} (KL {d.get('final_kl', float('nan')):.4f}, CE {d.get('final_ce', float('nan')):.4f})" if "final_loss" in d else "weights reused from the cache"
        lines += ["", f"KD: {d.get('alpha')} × KL(teacher ‖ student) at T={d.get('temperature')} + {1 - d.get('alpha', 0):.2g} × cross-entropy; "
                  f"student started from {d.get('init')} weights; final {loss}. Exact match is greedy decoding on the eval pairs."]
        curve = [e for e in d.get("evals") or [] if "exact_match" in e]
        if curve:
            lines.append("Student exact match during training: " + ", ".join(f"step {e['step']}: {e['exact_match']:.1f}%" for e in curve) + ".")
    timed = [(s.get("id", "?"), r) for s in steps for r in (s.get("metrics") or {}).get("generation") or []]
    if timed:
        lines += ["", "## Generation (ONNX Runtime, KV cache)", ""]
        lines += _table(
            ["Step", "Threads", "Batch", "Source tokens", "New tokens", "First token ms", "Total ms", "Tokens/s", "Decoding tokens/s"],
            [[sid, r.get("threads"), r.get("batch"), r.get("source_tokens"), r.get("new_tokens"), _num(r.get("first_token_ms"), ".2f"),
              _num(r.get("total_ms"), ".1f"), _num(r.get("tokens_per_s"), ".1f"), _num(r.get("decode_tokens_per_s"), ".1f")] for sid, r in timed],
            right={1, 2, 3, 4, 5, 6, 7, 8},
        )
        lines += ["", "Medians over the bench repeats; new tokens are generated without stopping at EOS, so every run does the same work. "
                  "Tokens/s counts the whole generation (prefill included); decoding tokens/s the tokens after the first."]
    return lines


def _pct(v: Any) -> str:
    return f"{v:.2f}%" if isinstance(v, (int, float)) else "—"
