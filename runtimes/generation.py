"""Token generation with a key/value cache on ONNX Runtime.

Runs the graphs that ``export/encdec_onnx.py`` writes for :class:`DecoderLM` and
:class:`EncoderDecoderLM` (``models/encdec.py``) with the semantics of that
module's ``generate()``: greedy at temperature 0, else sampled from
softmax(logits / temperature); a row that has produced EOS is padded with PAD.
Only numpy and onnxruntime are imported, so this file runs on a device without
torch.

Graph contract (names shared with the exporter through :func:`kv_names`):

- decoder-only ``decoder``: ``input_ids, past_key_i, past_value_i`` ->
  ``logits`` (the last position only), ``present_key_i, present_value_i``; prefill is the same graph with
  zero-length past tensors.
- encoder-decoder ``encoder``: ``input_ids, attention_mask`` -> ``cross_key_i,
  cross_value_i`` (run once per input); ``decoder``: ``decoder_input_ids,
  attention_mask, cross_*, past_*`` -> ``logits, present_*``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgekit.errors import UserError
from edgekit.runtimes.base import Session

ROLES = {"decoder": ("decoder",), "encdec": ("encoder", "decoder")}


def kv_names(prefix: str, layers: int) -> list[str]:
    """``{prefix}_key_0, {prefix}_value_0, {prefix}_key_1, ...``: the flat cache order of the graphs."""
    return [f"{prefix}_{part}_{i}" for i in range(layers) for part in ("key", "value")]


class OrtGenerator:
    """Generation loop over ORT sessions; ``sessions`` maps a role (``encoder``, ``decoder``) to a session."""

    def __init__(self, sessions: dict[str, Any], meta: dict[str, Any]):
        kind = meta.get("kind")
        if kind not in ROLES:
            raise UserError(f"generation meta has kind {kind!r}, not one of {', '.join(ROLES)}; re-export the model with edgekit")
        self.sessions = sessions
        self.meta = dict(meta)
        self.kind = kind
        self.layers = int(meta["layers"] if kind == "decoder" else meta["dec_layers"])
        self.bos, self.eos, self.pad = int(meta["bos"]), int(meta["eos"]), int(meta["pad"])
        self._past = kv_names("past", self.layers)
        self._present = kv_names("present", self.layers)
        self._cross = kv_names("cross", self.layers)

    @classmethod
    def load(cls, folder: str | Path, files: dict[str, str], meta: dict[str, Any], threads: int | None = None) -> "OrtGenerator":
        """Open the graphs of ``files`` (role -> file name in ``folder``) on the CPU."""
        import onnxruntime as ort

        kind = meta.get("kind")
        missing = [r for r in ROLES.get(kind, ()) if r not in files]
        if kind in ROLES and missing:
            raise UserError(f"the export has no {' or '.join(missing)} graph (files: {', '.join(files)}); re-export the model for generation")
        so = ort.SessionOptions()
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3  # errors only: a zero-length past is normal here, not worth a warning
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        # sessions take turns (encoder, then decoder steps); a pool left spinning after its turn
        # would take the cores from the next one, so worker threads sleep when idle
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions = {role: _open(ort, Path(folder) / files[role], so) for role in ROLES.get(kind, ())}
        return cls(sessions, meta)

    # -- generation ---------------------------------------------------------
    def generate(
        self,
        input_ids: np.ndarray,
        max_new_tokens: int,
        attention_mask: np.ndarray | None = None,
        temperature: float = 0.0,
        seed: int = 0,
        stop_at_eos: bool = True,
    ) -> np.ndarray:
        """New tokens (batch, <= max_new_tokens) after the source ``input_ids``; see the module docstring."""
        ids = _int_matrix(input_ids, "input_ids")
        cols = list(self.iter_tokens(ids, max_new_tokens, attention_mask, temperature, seed, stop_at_eos))
        return np.stack(cols, axis=1) if cols else np.zeros((ids.shape[0], 0), dtype=np.int64)

    def iter_tokens(
        self,
        input_ids: np.ndarray,
        max_new_tokens: int,
        attention_mask: np.ndarray | None = None,
        temperature: float = 0.0,
        seed: int = 0,
        stop_at_eos: bool = True,
    ) -> Iterator[np.ndarray]:
        """Yield each new token column (batch,) as soon as it is chosen (streaming, and first-token timing)."""
        step, seq = self._start(input_ids, attention_mask)
        rng = np.random.default_rng(seed) if temperature > 0 else None
        done = np.zeros(seq.shape[0], dtype=bool)
        past = self._empty_past(seq.shape[0])
        feed = seq  # the first step reads the whole prefix; later steps only the newest token
        for _ in range(max_new_tokens):
            logits, past = step(feed, past)
            nxt = np.where(done, self.pad, pick(logits[:, -1], temperature, rng)).astype(np.int64)
            done |= nxt == self.eos
            yield nxt
            if stop_at_eos and done.all():
                return
            feed = nxt[:, None]

    def first_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Logits (batch, vocab) of the first generated position (a parity probe for the export check)."""
        step, seq = self._start(input_ids, attention_mask)
        return step(seq, self._empty_past(seq.shape[0]))[0][:, -1]

    # -- steps --------------------------------------------------------------
    def _start(self, input_ids: np.ndarray, attention_mask: np.ndarray | None):
        """The step function for this input and the prefix the decoder reads first."""
        ids = _int_matrix(input_ids, "input_ids")
        mask = None if attention_mask is None else _int_matrix(attention_mask, "attention_mask")
        if mask is not None and mask.shape != ids.shape:
            raise UserError(f"attention_mask has shape {list(mask.shape)} but input_ids has {list(ids.shape)}; pass one mask value per token")
        if self.kind == "encdec":
            mask = np.ones_like(ids) if mask is None else mask  # no mask means every source token counts, as in torch
            cross = self._run("encoder", self._cross, {"input_ids": ids, "attention_mask": mask})
            fixed = {"attention_mask": mask, **dict(zip(self._cross, cross))}
            return (lambda feed, past: self._decode({"decoder_input_ids": feed, **fixed}, past)), np.full((ids.shape[0], 1), self.bos, np.int64)
        if mask is not None and not mask.all():
            raise UserError("decoder-only generation takes prompts of equal length (no padding); generate one row at a time")
        if ids.shape[1] == 0:
            raise UserError("decoder-only generation needs a prompt of at least one token; start it with BOS")
        return (lambda feed, past: self._decode({"input_ids": feed}, past)), ids

    def _decode(self, feeds: dict[str, np.ndarray], past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        out = self._run("decoder", ["logits", *self._present], {**feeds, **dict(zip(self._past, past))})
        return out[0], out[1:]

    def _run(self, role: str, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sessions[role].run(outputs, feeds)

    def _empty_past(self, batch: int) -> list[np.ndarray]:
        """Zero-length caches: the first step is a prefill through the same graph."""
        shape = (batch, int(self.meta["kv_heads"]), 0, int(self.meta["head_dim"]))
        return [np.zeros(shape, np.float32) for _ in self._past]


class GenerationSession(Session):
    """A generation export behind the runtimes' ``Session`` interface: ``run(feeds)`` returns
    ``[new tokens (batch, <= max_new_tokens)]``, greedy, for the ``input_ids`` (and, for an
    encoder-decoder, ``attention_mask``) it is fed; what ``load_session`` gives for such exports."""

    output_names = ["generated_ids"]

    def __init__(self, generator: OrtGenerator, max_new_tokens: int, info: dict[str, Any]):
        self.generator, self.max_new_tokens, self._info = generator, max_new_tokens, info
        self.input_names = ["input_ids", "attention_mask"] if generator.kind == "encdec" else ["input_ids"]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if "input_ids" not in feeds:
            raise UserError(f"a generation export takes input_ids, got {', '.join(feeds) or 'nothing'}")
        mask = feeds.get("attention_mask") if self.generator.kind == "encdec" else None
        return [self.generator.generate(feeds["input_ids"], self.max_new_tokens, mask)]

    def describe(self) -> dict[str, Any]:
        return dict(self._info)


def pick(logits: np.ndarray, temperature: float, rng: np.random.Generator | None) -> np.ndarray:
    """Next tokens (batch,): argmax at temperature <= 0, else one draw from softmax(logits / temperature)."""
    if temperature <= 0:
        return logits.argmax(-1)
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    cdf = np.cumsum(p, axis=-1)
    # u in (0, 1], so the chosen index always has positive probability (inverse-CDF sampling)
    u = (1.0 - rng.random((len(p), 1))) * cdf[:, -1:]
    return np.minimum((cdf < u).sum(-1), p.shape[-1] - 1)


def first_token_and_throughput(
    generator: OrtGenerator,
    input_ids: np.ndarray,
    new_tokens: int,
    attention_mask: np.ndarray | None = None,
    repeats: int = 5,
    warmup: int = 1,
) -> dict[str, Any]:
    """Median first-token latency and median time for ``new_tokens`` tokens (EOS ignored) over ``repeats`` runs.

    The first token's time runs from the call to having the token: the prefill
    (or encoder) and the first decoder step. Both come from the same runs.
    """
    ids = _checked(input_ids, new_tokens, repeats, warmup)
    for _ in range(warmup):
        _timed_run(generator, ids, new_tokens, attention_mask)
    runs = [_timed_run(generator, ids, new_tokens, attention_mask) for _ in range(repeats)]
    return _summary(runs, ids, new_tokens, warmup)


def paired_generation(
    generators: dict[str, OrtGenerator],
    input_ids: np.ndarray,
    new_tokens: int,
    attention_masks: dict[str, np.ndarray | None] | None = None,
    repeats: int = 5,
    warmup: int = 1,
) -> dict[str, dict[str, Any]]:
    """:func:`first_token_and_throughput` for several generators on the same input, timed in turns.

    Every repeat runs each generator once, the order rotating from repeat to
    repeat, so a drift in the machine's speed (on a shared CPU, up to 1.7x
    within seconds) hits them alike. Besides its own medians, each result holds
    ``vs_first``: the medians of its per-repeat time ratios to the first
    generator (``first_token``, ``total`` and ``decode``, the time after the
    first token; below 1 is faster).
    """
    if not generators:
        raise UserError("paired_generation needs at least one generator")
    ids = _checked(input_ids, new_tokens, repeats, warmup)
    masks = attention_masks or {}
    names = list(generators)

    def turn(shift: int) -> dict[str, tuple[float, float]]:
        order = names[shift % len(names):] + names[: shift % len(names)]
        return {n: _timed_run(generators[n], ids, new_tokens, masks.get(n)) for n in order}

    for i in range(warmup):
        turn(i)
    runs: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for i in range(repeats):
        for n, r in turn(i).items():
            runs[n].append(r)
    base = runs[names[0]]
    out = {}
    for n in names:
        pairs = list(zip(runs[n], base))
        out[n] = _summary(runs[n], ids, new_tokens, warmup) | {"vs_first": {
            "first_token": statistics.median(r[0] / b[0] for r, b in pairs),
            "total": statistics.median(r[1] / b[1] for r, b in pairs),
            "decode": statistics.median((r[1] - r[0]) / max(b[1] - b[0], 1e-9) for r, b in pairs) if new_tokens > 1 else None,
        }}
    return out


def _checked(input_ids: Any, new_tokens: int, repeats: int, warmup: int) -> np.ndarray:
    if new_tokens < 1 or repeats < 1 or warmup < 0:
        raise UserError(f"need new_tokens >= 1, repeats >= 1 and warmup >= 0, got {new_tokens}, {repeats} and {warmup}; fix the bench settings")
    return _int_matrix(input_ids, "input_ids")


def _summary(runs: list[tuple[float, float]], ids: np.ndarray, new_tokens: int, warmup: int) -> dict[str, Any]:
    """Medians over ``runs`` of (seconds to the first token, seconds to the last)."""
    first = statistics.median(r[0] for r in runs)
    total = statistics.median(r[1] for r in runs)
    # the tokens after the first, over the time after it: the decoding rate with the input already read
    decode = statistics.median(ids.shape[0] * (new_tokens - 1) / max(r[1] - r[0], 1e-9) for r in runs) if new_tokens > 1 else None
    return {
        "first_token_ms": first * 1e3,
        "total_ms": total * 1e3,
        "tokens_per_s": ids.shape[0] * new_tokens / total,
        "decode_tokens_per_s": decode,
        "batch": int(ids.shape[0]),
        "source_tokens": int(ids.shape[1]),
        "new_tokens": int(new_tokens),
        "repeats": len(runs),
        "warmup": int(warmup),
    }


def _timed_run(generator: OrtGenerator, ids: np.ndarray, new_tokens: int, mask: np.ndarray | None) -> tuple[float, float]:
    """Seconds to the first token and to the last of ``new_tokens``."""
    started = time.perf_counter()
    tokens = generator.iter_tokens(ids, new_tokens, mask, stop_at_eos=False)
    next(tokens)
    first = time.perf_counter() - started
    for _ in tokens:
        pass
    return first, time.perf_counter() - started


def _int_matrix(a: Any, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise UserError(f"{name} must be an integer array of shape (batch, tokens), got {arr.dtype} {list(arr.shape)}; add a batch axis or cast it")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _open(ort, path: Path, options) -> Any:
    if not path.is_file():
        raise UserError(f"{path} does not exist; point at the folder of the generation export")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a valid ONNX model for ONNX Runtime ({first}); re-export it") from None
