"""The BlockFFN part of the report: sparsity before and after, the quality cost, and the speedup.

Reads the ``blockffn`` metrics that moe.blockffn leaves in a step's manifest and
the step's own benchmarks: the same model timed on torch (every expert computed,
the dense fallback) and on the ``blockffn`` runtime (edgekit's sparse kernels).
"""

from __future__ import annotations

from typing import Any

ROWS = (("dense", "dense FFN"), ("before", "converted, before fine-tuning"), ("after", "BlockFFN, fine-tuned"))


def render_blockffn_section(steps: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for step in steps:
        m = (step.get("metrics") or {}).get("blockffn")
        if not m:
            continue
        lines += ["", f"## BlockFFN ({step.get('id', '?')})", ""]
        ft = m.get("finetune") or {}
        lines.append(
            f"{m.get('layers')} FFN layers, each split into {m.get('experts')} experts of {m.get('expert_size')} neurons; "
            f"fine-tuned {ft.get('steps', 0)} steps with the activation-locality and chunk-sparsification losses"
            + (f" (final λ_cs {ft['lambda_cs_final']:g}, {ft['seconds']} s)." if "lambda_cs_final" in ft else ".")
            + (" Weights reused from the cache." if m.get("cached") else "")
        )
        lines += ["", "| Model | Perplexity | TLS | CLS (8 tokens) | CLS (32 tokens) | Tokens with no expert |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for key, label in ROWS:
            r = m.get(key)
            if r:
                lines.append(f"| {label} | {_num(r.get('ppl'), '.3f')} | {_pct(r.get('tls'))} | {_pct(r.get('cls_8'))} | "
                             f"{_pct(r.get('cls_32'))} | {_pct(r.get('zero_active_tokens'))} |")
        lines.append("\nTLS: share of (token, expert) pairs inactive; CLS: share inactive for every token of a chunk of consecutive tokens.")
        per_layer = (m.get("after") or {}).get("per_layer_tls") or {}
        if per_layer:
            lines.append("Per-layer TLS after fine-tuning: " + ", ".join(f"{k} {_pct(v)}" for k, v in per_layer.items()) + ".")
        lines += _speedup(step)
    return lines


def _speedup(step: dict[str, Any]) -> list[str]:
    rows = [b for b in (step.get("metrics") or {}).get("bench") or [] if b.get("batch_size") == 1]
    out = []
    for sparse in (b for b in rows if b.get("runtime") == "blockffn"):
        dense = next((b for b in rows if b.get("runtime") == "torch" and b.get("threads") == sparse.get("threads")), None)
        p_sparse, p_dense = _p50(sparse), _p50(dense)
        if p_sparse and p_dense:
            mode = (sparse.get("describe") or {}).get("mode", "")
            threads = sparse.get("threads")
            out.append(f"Measured: a batch-1 forward on the sparse kernels ({mode}) takes {p_sparse:.2f} ms against {p_dense:.2f} ms "
                       f"on torch computing every expert: {p_dense / p_sparse:.2f}x, {threads} thread{'' if threads == 1 else 's'}.")
    return ["", *out] if out else []


def _p50(b: dict[str, Any] | None) -> float | None:
    v = ((b or {}).get("latency_ms") or {}).get("p50")
    return float(v) if isinstance(v, (int, float)) else None


def _pct(v: Any) -> str:
    return f"{v:.1%}" if isinstance(v, (int, float)) and v == v else "—"


def _num(v: Any, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "—"
