"""ONNX export of edgekit's language models for generation with a key/value cache.

:class:`DecoderLM` becomes one ``decoder.onnx`` (token ids + past cache -> logits +
present cache) that serves both the prefill (past of length 0) and every decode
step. :class:`EncoderDecoderLM` becomes ``encoder.onnx`` (the encoder and every
decoder layer's cross-attention keys/values: run once per input) and
``decoder.onnx`` (one decoder step over those and the self-attention cache).
``runtimes/generation.py`` runs them; :func:`export_generation_artifact` is the
``export.onnx`` pass's branch for these models, verified by greedy generation
token for token against torch.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgekit.artifact import Artifact, torch_state_bytes
from edgekit.errors import StepFailed, UserError
from edgekit.export.onnx import _custom_opsets, _quiet_output
from edgekit.export.verify import short_reason
from edgekit.runtimes.generation import OrtGenerator, kv_names

KINDS = ("decoder", "encdec")
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
SINGLE_FILE_BYTES = 2**31 - 2**26  # above this protobuf needs external weights, which this export does not write
# traced at sizes that are all different and > 1, so no size can be mistaken for another or baked in as 1
TRACE_BATCH, TRACE_TOKENS, TRACE_PAST, TRACE_SOURCE = 2, 3, 4, 5
VERIFY_NEW_TOKENS = 8
RANDOM_SOURCE_TOKENS = 16  # length of random verify sources when the specs do not say


def generation_meta(module: nn.Module) -> dict[str, Any]:
    """What the runtime needs besides the graphs (token ids, cache shapes), as plain JSON."""
    kind = getattr(module, "kind", None)
    if kind not in KINDS:
        raise UserError(f"generation export takes DecoderLM or EncoderDecoderLM models, not {type(module).__name__}; use the plain export.onnx path")
    cfg = module.cfg
    depth = {"layers": cfg.layers} if kind == "decoder" else {"dec_layers": cfg.dec_layers}
    return {"kind": kind, "bos": cfg.bos, "eos": cfg.eos, "pad": cfg.pad, **depth, "kv_heads": cfg.kv_heads, "head_dim": cfg.hd, "vocab": cfg.vocab}


# -- wrappers: the models' cached steps with flat tensor arguments ------------------

def _pairs(flat: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def _flat(pairs) -> tuple[torch.Tensor, ...]:
    return tuple(t for kv in pairs for t in kv)


class _DecoderOnlyStep(nn.Module):
    """DecoderLM.step: (input_ids, *past) -> (last position's logits, *present)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, cache = self.model.step(input_ids, _pairs(past), last_only=True)
        return (logits, *_flat(cache))


class _Encoder(nn.Module):
    """encode + cross_kv: (input_ids, attention_mask) -> (*cross)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _flat(self.model.cross_kv(self.model.encode(input_ids, attention_mask)))


class _DecoderStep(nn.Module):
    """EncoderDecoderLM.decode_step: (decoder_input_ids, attention_mask, *cross, *past) -> (last position's logits, *present)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.n = 2 * len(model.decoder)

    def forward(self, decoder_input_ids: torch.Tensor, attention_mask: torch.Tensor, *kv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cross, past = _pairs(kv[: self.n]), _pairs(kv[self.n :])
        logits, cache = self.model.decode_step(decoder_input_ids, cross, attention_mask, past, last_only=True)
        return (logits, *_flat(cache))


# -- the graphs ---------------------------------------------------------------------

@dataclass
class _Graph:
    file: str
    wrapper: nn.Module
    args: tuple[torch.Tensor, ...]
    inputs: list[str]
    outputs: list[str]
    axes: dict[str, dict[int, str]]


def _graphs(module: nn.Module) -> dict[str, _Graph]:
    """role -> graph to export, with example arguments at the trace sizes."""
    cfg = module.cfg
    gen = torch.Generator().manual_seed(0)
    layers = cfg.layers if module.kind == "decoder" else cfg.dec_layers
    past_names, present_names, cross_names = kv_names("past", layers), kv_names("present", layers), kv_names("cross", layers)

    def ids(t: int) -> torch.Tensor:
        return torch.randint(min(4, cfg.vocab - 1), cfg.vocab, (TRACE_BATCH, t), generator=gen)

    def cache(length: int) -> tuple[torch.Tensor, ...]:
        return tuple(torch.randn(TRACE_BATCH, cfg.kv_heads, length, cfg.hd, generator=gen) for _ in past_names)

    kv_axes = {n: {0: "batch", 2: "past"} for n in past_names} | {n: {0: "batch", 2: "total"} for n in present_names}
    step_axes = {"logits": {0: "batch"}, **kv_axes}  # logits of the last position only: (batch, 1, vocab)
    step_outputs = ["logits", *present_names]
    if module.kind == "decoder":
        return {"decoder": _Graph(
            DECODER_FILE, _DecoderOnlyStep(module), (ids(TRACE_TOKENS), *cache(TRACE_PAST)),
            ["input_ids", *past_names], step_outputs, {"input_ids": {0: "batch", 1: "tokens"}, **step_axes},
        )}
    mask = torch.ones(TRACE_BATCH, TRACE_SOURCE, dtype=torch.long)
    mask[1, TRACE_SOURCE - 2 :] = 0  # a padded row, so masking is exercised while tracing
    source_axes = {"input_ids": {0: "batch", 1: "source"}, "attention_mask": {0: "batch", 1: "source"}}
    cross_axes = {n: {0: "batch", 2: "source"} for n in cross_names}
    cross = cache(TRACE_SOURCE)  # random stand-ins: running the encoder here would bump the model's encoder_calls
    return {
        "encoder": _Graph(ENCODER_FILE, _Encoder(module), (ids(TRACE_SOURCE), mask), ["input_ids", "attention_mask"], cross_names, {**source_axes, **cross_axes}),
        "decoder": _Graph(
            DECODER_FILE, _DecoderStep(module), (ids(TRACE_TOKENS), mask, *cross, *cache(TRACE_PAST)),
            ["decoder_input_ids", "attention_mask", *cross_names, *past_names], step_outputs,
            {"decoder_input_ids": {0: "batch", 1: "tokens"}, "attention_mask": source_axes["attention_mask"], **cross_axes, **step_axes},
        ),
    }


def export_generation(module: nn.Module, folder: Path, opset: int = 17, *, where: str = "export.onnx") -> dict[str, str]:
    """Write the generation graphs of ``module`` into ``folder``, checked; returns {role: file name}.

    The graphs are written and checked in a scratch folder beside ``folder`` and
    moved in only when all of them pass, so ``folder`` never holds half an export.
    """
    import onnx

    generation_meta(module)  # refuses other models with a clear message
    if torch_state_bytes(module) > SINGLE_FILE_BYTES:
        raise UserError("the model's weights exceed 2 GB, too big for a single-file ONNX graph; export a smaller model (e.g. quantize it first)")
    module = module.eval()
    graphs = _graphs(module)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        for g in graphs.values():
            _export_graph(g, scratch / g.file, opset, where, _custom_opsets(module))
            try:
                onnx.checker.check_model(str(scratch / g.file), full_check=True)
            except Exception as e:
                raise StepFailed(f"the exported {g.file} fails onnx.checker ({short_reason(e)}); try another {where}.opset") from None
        for g in graphs.values():
            os.replace(scratch / g.file, folder / g.file)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {role: g.file for role, g in graphs.items()}


def _export_graph(g: _Graph, path: Path, opset: int, where: str, custom: dict[str, Any]) -> None:
    """Trace one graph with the torchscript exporter; TracerWarnings (a size baked in) are re-raised as warnings."""
    # the exporter dumps its IR to stdout on failure; hidden, the error below says what failed
    with warnings.catch_warnings(record=True) as caught, _quiet_output():
        warnings.simplefilter("always")
        try:
            torch.onnx.export(
                g.wrapper, g.args, str(path), dynamo=False, opset_version=opset, input_names=g.inputs,
                output_names=g.outputs, dynamic_axes=g.axes, do_constant_folding=True, **custom,
            )
        except Exception as e:
            # not export.onnx's usual hint: the dynamo exporter is no alternative here
            fix = f"set {where}.opset to 11 or higher" if opset < 11 else "the model's step functions do not trace; report it with this message"
            raise StepFailed(f"ONNX export of {g.file} failed ({type(e).__name__}: {short_reason(e)}); {fix}") from None
    for w in caught:
        if issubclass(w.category, torch.jit.TracerWarning):
            warnings.warn(f"{g.file}: {w.message}", torch.jit.TracerWarning, stacklevel=3)


# -- the export.onnx branch ---------------------------------------------------------

def export_generation_artifact(artifact: Artifact, ctx, cfg) -> Artifact:
    """``export.onnx`` for DecoderLM / EncoderDecoderLM: generation graphs in ``ctx.workdir``, verified by greedy generation."""
    where = getattr(ctx, "path", None) or "export[i].onnx"
    _check_settings(cfg, where)
    module = artifact.torch_module().eval()
    started = time.perf_counter()
    files = export_generation(module, ctx.workdir, cfg.opset, where=where)
    meta = generation_meta(module)
    ctx.metrics["export"] = {
        "opset": cfg.opset,
        "exporter": "torchscript",
        "graphs": dict(files),
        "kv_cache": True,
        "trace": {"batch": TRACE_BATCH, "tokens": TRACE_TOKENS, "past": TRACE_PAST, "source": TRACE_SOURCE},
        "seconds": round(time.perf_counter() - started, 3),
    }
    if cfg.verify.enabled:
        ids, mask, origin = _verify_source(artifact, ctx, module, cfg.verify.samples)
        result = verify_generation(module, OrtGenerator.load(ctx.workdir, files, meta), ids, mask)
        ctx.metrics["verify"] = {**result, "source": origin}
        if not result["generation_equal"]:
            raise StepFailed(
                f"greedy generation on ONNX Runtime differs from PyTorch on {result['mismatched_rows']} of {result['rows']} rows "
                f"(first-token logits differ by up to {result['max_abs_first_logits']:.1e}); try another {where}.opset, "
                f"or set {where}.verify.enabled: false if such differences are expected (e.g. a quantized model)"
            )
    return artifact.derive(format="onnx", folder=ctx.workdir, files=files, builder=None, module=None, meta={**artifact.meta, "generation": meta})


def _check_settings(cfg, where: str) -> None:
    """Refuse export.onnx settings that the generation graphs cannot honour, rather than ignore them."""
    if cfg.exporter != "torchscript":
        raise UserError(f"language models export for generation with the torchscript exporter only; remove {where}.exporter: {cfg.exporter}")
    if not cfg.dynamic:
        raise UserError(f"generation graphs need dynamic token and cache lengths; remove {where}.dynamic: false")
    if cfg.simplify:
        raise UserError(f"{where}.simplify is not supported for generation graphs; remove it")


def verify_generation(module: nn.Module, generator: OrtGenerator, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, Any]:
    """Greedy generation through ``generator`` vs torch ``generate()`` on the same rows.

    A decoder-only model generates row by row (its prompts cannot be padded), each
    row cut to its own length; an encoder-decoder takes all rows as one padded batch.
    """
    from edgekit.models.encdec import generate

    if module.kind == "decoder":
        batches = [(input_ids[i : i + 1, : max(1, int(attention_mask[i].sum()))], None) for i in range(len(input_ids))]
    else:
        width = max(1, int(attention_mask.sum(-1).max()))
        batches = [(input_ids[:, :width], attention_mask[:, :width])]
    mismatched, compared, max_abs = 0, 0, 0.0
    for ids, mask in batches:
        got = generator.generate(ids, VERIFY_NEW_TOKENS, mask)
        want = generate(module, torch.from_numpy(ids), VERIFY_NEW_TOKENS, None if mask is None else torch.from_numpy(mask)).numpy()
        mismatched += _mismatched_rows(got, want)
        compared += want.size
        max_abs = max(max_abs, float(np.abs(generator.first_logits(ids, mask) - _torch_first_logits(module, ids, mask)).max()))
    return {  # the keys every parity check reports, plus the generation comparison
        "passed": mismatched == 0,
        "samples": int(len(input_ids)),
        "max_abs": max_abs,  # of the first generated position's logits
        "generation_equal": mismatched == 0,
        "rows": int(len(input_ids)),
        "mismatched_rows": mismatched,
        "new_tokens": VERIFY_NEW_TOKENS,
        "tokens_compared": int(compared),
        "max_abs_first_logits": max_abs,
        "runtime": "onnxruntime",
    }


def _mismatched_rows(got: np.ndarray, want: np.ndarray) -> int:
    if got.shape != want.shape:  # one side stopped earlier: compare what both have, count the rest as different
        n = min(got.shape[1], want.shape[1])
        return int(max((got[:, :n] != want[:, :n]).any(1).sum(), 1))
    return int((got != want).any(1).sum())


@torch.no_grad()
def _torch_first_logits(module: nn.Module, ids: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    x = torch.from_numpy(ids)
    if module.kind == "decoder":
        return module.step(x)[0][:, -1].numpy()
    start = torch.full((len(ids), 1), module.cfg.bos, dtype=torch.long)
    return module(x, attention_mask=None if mask is None else torch.from_numpy(mask), decoder_input_ids=start)[:, -1].numpy()


def _verify_source(artifact: Artifact, ctx, module: nn.Module, n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """input_ids / attention_mask (padding at the end) from the eval or calibration split, else random tokens."""
    data = getattr(ctx, "data", None)
    for split in ("eval", "calibration"):
        if data is not None and data.has_split(split):
            arrays = data.split(split).arrays
            if "input_ids" in arrays and len(arrays["input_ids"]):
                ids = np.asarray(arrays["input_ids"][:n], dtype=np.int64)
                mask = arrays.get("attention_mask")
                mask = np.ones_like(ids) if mask is None else np.asarray(mask[:n], dtype=np.int64)
                return ids, mask, split
    vocab = module.cfg.vocab
    ids = np.random.default_rng(ctx.seed).integers(min(4, vocab - 1), vocab, size=(n, _source_length(artifact, ctx)), dtype=np.int64)
    return ids, np.ones_like(ids), "random"


def _source_length(artifact: Artifact, ctx) -> int:
    """The specs' sequence length (a named dim resolved from ``ctx.dims``), else a short default."""
    shape = artifact.inputs[0].shape if artifact.inputs else []
    if len(shape) < 2:
        return RANDOM_SOURCE_TOKENS
    dim = shape[1]
    return int(dim) if isinstance(dim, int) else int(ctx.dims.get(dim, RANDOM_SOURCE_TOKENS))
