"""ONNX export of a DecoderLM or TinyLM as a speculative-decoding verifier (run by ``runtimes/decoding/ort_target.py``).

``verifier.onnx`` is the model's ``step`` with explicit positions and tree mask, returning the
logits and final hidden state of every fed position (a draft is verified in one pass, and a
trained draft head reads the hidden state). ``embedding.npy`` (and ``lm_head.npy`` for an
untied head) carry the weights such a head needs without torch; ``verifier.json`` the rest.

Graph contract: ``input_ids (1, t) int64, position_ids (t,) int64, tree_mask (t, t) bool,
past_key_i / past_value_i (1, kv_heads, past, head_dim)`` -> ``logits (1, t, vocab),
hidden (1, t, dim), present_key_i / present_value_i (1, kv_heads, past + t, head_dim)``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgekit.artifact import torch_state_bytes
from edgekit.errors import StepFailed, UserError
from edgekit.export.encdec_onnx import SINGLE_FILE_BYTES, TRACE_PAST, TRACE_TOKENS, _export_graph, _flat, _Graph, _pairs
from edgekit.export.onnx import _custom_opsets
from edgekit.export.verify import short_reason
from edgekit.runtimes.decoding.target import final_hidden
from edgekit.runtimes.generation import kv_names

GRAPH_FILE = "verifier.onnx"
META_FILE = "verifier.json"
EMBEDDING_FILE = "embedding.npy"
HEAD_FILE = "lm_head.npy"
PARITY_RTOL = 1e-4  # of the largest |logit|: float32 reordering in ORT stays far below it


class _Verifier(nn.Module):
    """The model's step with positions and tree mask: (input_ids, position_ids, tree_mask, *past) -> (logits, hidden, *present)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, tree_mask: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # the hidden state is the final norm's output as the LM head read it, not a recomputation
        with final_hidden(self.model) as seen:
            logits, cache = self.model.step(input_ids, _pairs(past), positions=position_ids, tree_mask=tree_mask)
        return (logits, seen[-1], *_flat(cache))


def _layout(module: nn.Module) -> dict[str, Any]:
    """Cache shapes, vocabulary and the embedding / untied LM head of a DecoderLM or TinyLM."""
    from edgekit.models.encdec import DecoderLM
    from edgekit.models.tiny_lm import TinyLM

    if isinstance(module, DecoderLM):
        cfg = module.cfg
        return {"layers": cfg.layers, "kv_heads": cfg.kv_heads, "head_dim": cfg.hd, "vocab": cfg.vocab, "dim": cfg.dim,
                "tokens": {"bos": cfg.bos, "eos": cfg.eos, "pad": cfg.pad}, "embedding": module.embed_tokens.weight, "lm_head": module.lm_head}
    if isinstance(module, TinyLM):
        attn = module.blocks[0].attn
        return {"layers": len(module.blocks), "kv_heads": attn.heads, "head_dim": attn.head_dim, "vocab": module.vocab, "dim": module.dim,
                "tokens": {}, "embedding": module.embed.weight, "lm_head": None, "max_len": module.max_seq}
    raise UserError(
        f"the speculative-decoding verifier exports edgekit's DecoderLM (Llama / Qwen2 / Mistral checkpoints convert into it) "
        f"or TinyLM, not {type(module).__name__}; convert the model or decode it on torch"
    )


def verifier_meta(module: nn.Module) -> dict[str, Any]:
    lay = _layout(module)
    files = {"graph": GRAPH_FILE, "embedding": EMBEDDING_FILE} | ({} if lay["lm_head"] is None else {"lm_head": HEAD_FILE})
    return {
        "kind": "verifier", **{k: lay[k] for k in ("layers", "kv_heads", "head_dim", "vocab", "dim")}, **lay["tokens"],
        **({"max_len": lay["max_len"]} if "max_len" in lay else {}), "files": files,
        **({"tokenizer": "bytes"} if getattr(module, "tokenizer", None) == "bytes" else {}),  # byte-level: no tokenizer files needed
    }


def _graph(module: nn.Module) -> _Graph:
    cfg = _layout(module)
    gen = torch.Generator().manual_seed(0)
    past, present = kv_names("past", cfg["layers"]), kv_names("present", cfg["layers"])
    t = TRACE_TOKENS  # traced with t != past length, both > 1, so neither is baked in
    args = (
        torch.randint(0, cfg["vocab"], (1, t), generator=gen),
        torch.arange(TRACE_PAST, TRACE_PAST + t),
        torch.ones(t, t, dtype=torch.bool).tril(),
        *(torch.randn(1, cfg["kv_heads"], TRACE_PAST, cfg["head_dim"], generator=gen) for _ in past),
    )
    axes = {
        "input_ids": {1: "tokens"}, "position_ids": {0: "tokens"}, "tree_mask": {0: "tokens", 1: "tokens"},
        "logits": {1: "tokens"}, "hidden": {1: "tokens"},
        **{n: {2: "past"} for n in past}, **{n: {2: "total"} for n in present},
    }
    return _Graph(GRAPH_FILE, _Verifier(module), args, ["input_ids", "position_ids", "tree_mask", *past], ["logits", "hidden", *present], axes)


def export_verifier(module: nn.Module, folder: Path, opset: int = 17) -> dict[str, Any]:
    """Write verifier.onnx, the embedding (and untied LM head) and verifier.json into ``folder``; returns the meta.

    Everything is written, checked with onnx.checker and compared with torch (:func:`check_verifier`)
    in a scratch folder beside ``folder``, and moved in only when it all passes.
    """
    import onnx

    meta = verifier_meta(module)
    if torch_state_bytes(module) > SINGLE_FILE_BYTES:
        raise UserError("the model's weights exceed 2 GB, too big for a single-file ONNX graph; export a smaller model")
    module = module.eval()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        g = _graph(module)
        _export_graph(g, scratch / GRAPH_FILE, opset, "export_verifier", _custom_opsets(module))
        try:
            onnx.checker.check_model(str(scratch / GRAPH_FILE), full_check=True)
        except Exception as e:
            raise StepFailed(f"the exported {GRAPH_FILE} fails onnx.checker ({short_reason(e)}); try another opset") from None
        lay = _layout(module)
        np.save(scratch / EMBEDDING_FILE, lay["embedding"].detach().float().numpy())
        if lay["lm_head"] is not None:
            np.save(scratch / HEAD_FILE, lay["lm_head"].weight.detach().float().numpy())
        (scratch / META_FILE).write_text(json.dumps(meta, indent=2))
        check_verifier(module, scratch)
        for name in meta["files"].values():
            os.replace(scratch / name, folder / name)
        if "lm_head" not in meta["files"]:
            (folder / HEAD_FILE).unlink(missing_ok=True)  # left by an earlier export of an untied model
        os.replace(scratch / META_FILE, folder / META_FILE)  # last: the index names only files already in place
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return meta


def check_verifier(module: nn.Module, folder: Path, seed: int = 0) -> float:
    """ORT vs torch ``step`` on a prefill, a chain step and a tree step (non-causal mask, repeated
    positions); returns the largest logit difference relative to the logit scale, raises StepFailed above
    :data:`PARITY_RTOL`."""
    from edgekit.runtimes.decoding.ort_target import OrtTarget

    lay = _layout(module)
    vocab = lay["vocab"]
    rng = np.random.default_rng(seed)
    ort_target = OrtTarget.load(folder, threads=1)
    reference = _Verifier(module.eval())
    tree = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=bool)  # root, two children, a grandchild
    feeds = [(5, None, None), (3, None, None), (4, np.array([8, 9, 9, 10]), tree)]  # after 5 + 3 cached tokens
    past = [torch.zeros(1, lay["kv_heads"], 0, lay["head_dim"]) for _ in range(2 * lay["layers"])]
    worst = 0.0
    for i, (t, positions, mask) in enumerate(feeds):
        ids = rng.integers(0, vocab, size=t, dtype=np.int64)
        pos = np.arange(ort_target.length, ort_target.length + t) if positions is None else positions
        mask = np.tril(np.ones((t, t), dtype=bool)) if mask is None else mask
        got_logits, got_hidden = ort_target.forward(ids, pos, mask)
        with torch.inference_mode():
            logits, hidden, *past = reference(torch.from_numpy(ids)[None], torch.from_numpy(pos), torch.from_numpy(mask), *past)
        for got, want in ((got_logits, logits[0].numpy()), (got_hidden, hidden[0].numpy())):
            worst = max(worst, float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)))
        if worst > PARITY_RTOL:
            step = ("prefill", "chain step", "tree step")[i]
            raise StepFailed(f"{GRAPH_FILE} on ONNX Runtime differs from torch on a {step} by {worst:.1e} of the output scale; try another opset")
    return worst
