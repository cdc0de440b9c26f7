"""Decoder-only and encoder-decoder language models from one set of Llama-style parts.

Both follow the design of "Return of the Encoder" (Microsoft, 2025): pre-RMSNorm,
grouped-query attention, SwiGLU FFNs, tied embeddings, rotary positions in every
self-attention. :class:`DecoderLM` is the decoder-only teacher (parameter names
match Hugging Face ``LlamaForCausalLM``, so :func:`decoder_from_hf` copies a
Llama / Qwen2 / Mistral checkpoint into it). :class:`EncoderDecoderLM` is the
student: the encoder reads the source once with positions centred on the middle
of the (unpadded) input; the decoder counts positions from 0, attends to itself
causally (rotary) and to the encoder output through cross-attention (no rotary),
whose keys and values are computed once per input by :meth:`EncoderDecoderLM.cross_kv`.

Both decode with a key/value cache (:meth:`DecoderLM.step`,
:meth:`EncoderDecoderLM.decode_step`), and :func:`greedy_generate` /
:func:`sample_generate` run either on torch. ONNX export and the ONNX Runtime
generation loop live in ``export/encdec_onnx.py`` and ``runtimes/generation.py``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from edgekit.artifact import TensorSpec
from edgekit.errors import UserError
from edgekit.models.registry import register_model

KV = tuple[torch.Tensor, torch.Tensor]  # keys, values: (batch, kv_heads, T, head_dim)
PAD, BOS, EOS = 0, 1, 2  # the token ids edgekit's generated tasks use; a teacher may set its own


@dataclass(frozen=True)
class LMConfig:
    vocab: int
    dim: int
    heads: int
    kv_heads: int
    ffn: int
    layers: int = 0  # decoder-only depth
    enc_layers: int = 0  # encoder-decoder depths
    dec_layers: int = 0
    head_dim: int = 0  # 0: dim // heads
    rope_theta: float = 10000.0
    eps: float = 1e-6
    attention_bias: bool = False
    tie_embeddings: bool = True
    bos: int = BOS
    eos: int = EOS
    pad: int = PAD

    @property
    def hd(self) -> int:
        return self.head_dim or self.dim // self.heads

    def check(self) -> None:
        if self.heads % self.kv_heads:
            raise UserError(f"the head count {self.heads} must be a multiple of the key/value head count {self.kv_heads} (grouped-query attention)")
        if not self.head_dim and self.dim % self.heads:
            raise UserError(f"the width {self.dim} must be a multiple of the head count {self.heads}, or set head_dim")
        if self.hd % 2:
            raise UserError(f"rotary embeddings need an even head size, got {self.hd}")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (batch, 1, T, head_dim) for float ``positions (batch, T)``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Grouped-query attention; self-attention (optionally rotary, cached) or cross-attention."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.heads, self.kv_heads, self.hd = cfg.heads, cfg.kv_heads, cfg.hd
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.dim, cfg.heads * cfg.hd, bias=bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.hd, bias=bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.hd, bias=bias)
        self.o_proj = nn.Linear(cfg.heads * cfg.hd, cfg.dim, bias=False)

    def project_kv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> KV:
        b, t = x.shape[0], x.shape[1]
        k = self.k_proj(x).reshape(b, t, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v_proj(x).reshape(b, t, self.kv_heads, self.hd).transpose(1, 2)
        if rope is not None:
            k = apply_rope(k, *rope)
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        kv: KV,
        allowed: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Attend from ``x`` to keys/values ``kv``; ``allowed`` is a bool mask broadcastable to (b, heads, Tq, Tk)."""
        b, t = x.shape[0], x.shape[1]
        q = self.q_proj(x).reshape(b, t, self.heads, self.hd).transpose(1, 2)
        if rope is not None:
            q = apply_rope(q, *rope)
        k, v = kv
        if self.kv_heads != self.heads:  # each key/value head serves a group of query heads
            rep = self.heads // self.kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.hd))
        if allowed is not None:
            att = att.masked_fill(~allowed, torch.finfo(att.dtype).min)
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, self.heads * self.hd)
        return self.o_proj(y)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    """Pre-norm self-attention (+ cross-attention in a decoder of an encoder-decoder) + SwiGLU."""

    def __init__(self, cfg: LMConfig, ffn: int, cross: bool = False):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.eps)
        self.self_attn = Attention(cfg)
        if cross:
            self.cross_layernorm = RMSNorm(cfg.dim, cfg.eps)
            self.cross_attn = Attention(replace(cfg, attention_bias=False))
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.eps)
        self.mlp = SwiGLU(cfg.dim, ffn)

    def forward(self, x, rope, allowed, past: KV | None = None, cross_kv: KV | None = None, cross_allowed=None) -> tuple[torch.Tensor, KV]:
        h = self.input_layernorm(x)
        k, v = self.self_attn.project_kv(h, rope)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        x = x + self.self_attn(h, (k, v), allowed, rope)
        if cross_kv is not None:
            x = x + self.cross_attn(self.cross_layernorm(x), cross_kv, cross_allowed)
        return x + self.mlp(self.post_attention_layernorm(x)), (k, v)


def causal_allowed(t: int, n_keys: int, device=None) -> torch.Tensor:
    """(1, 1, t, n_keys): query i (the last t of n_keys positions) sees keys up to its own position."""
    q_pos = torch.arange(t, device=device) + (n_keys - t)
    return (torch.arange(n_keys, device=device).unsqueeze(0) <= q_pos.unsqueeze(1)).reshape(1, 1, t, n_keys)


class _Embedded(nn.Module):
    def _make_embeddings(self, cfg: LMConfig) -> None:
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.dim)
        self.norm = RMSNorm(cfg.dim, cfg.eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab, bias=False)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return x @ self.embed_tokens.weight.t() if self.lm_head is None else self.lm_head(x)

    def _init(self, depth: int) -> None:
        resid = 0.02 / math.sqrt(2 * depth)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                continue
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=resid)
            else:
                nn.init.normal_(p, std=0.02)


class DecoderLM(_Embedded):
    """Decoder-only causal LM (Llama layout). ``forward(input_ids) -> logits (batch, T, vocab)``."""

    kind = "decoder"

    def __init__(self, cfg: LMConfig):
        super().__init__()
        cfg.check()
        if cfg.layers < 1:
            raise UserError(f"a decoder-only model needs at least one layer, got {cfg.layers}")
        self.cfg = cfg
        self._make_embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg, cfg.ffn) for _ in range(cfg.layers))
        self._init(cfg.layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits; padding at the end of a row (``attention_mask`` 0) does not affect the tokens before it."""
        return self.step(input_ids)[0]

    def step(
        self,
        input_ids: torch.Tensor,
        past: list[KV] | None = None,
        last_only: bool = False,
        positions: torch.Tensor | None = None,
        tree_mask: torch.Tensor | None = None,
        skip: frozenset[int] | set[int] = frozenset(),
    ) -> tuple[torch.Tensor, list[KV]]:
        """Logits for ``input_ids (batch, t)`` following the cached ``past`` (only the last position's
        with ``last_only``: generation needs no more, and a prompt's other logits cost t x vocab), and the extended cache.

        Speculative decoding passes the rest: ``positions (t,)`` (default: right after the cache),
        ``tree_mask (t, t)`` bool, which new token sees which (default causal; every new token sees the
        whole cache), and ``skip``, layer indices run as identity (a self-draft; their cache is passed through).
        """
        start = 0 if past is None else past[0][0].shape[2]
        t = input_ids.shape[1]
        if positions is None:
            positions = torch.arange(t) + start
        rope = rope_tables(positions.unsqueeze(0).expand(input_ids.shape[0], t), self.cfg.hd, self.cfg.rope_theta)
        masks: dict[int, torch.Tensor] = {}  # by cache length: skipped layers' caches lag behind in a self-draft

        def allowed(n_past: int) -> torch.Tensor:
            if n_past not in masks:
                masks[n_past] = causal_allowed(t, n_past + t) if tree_mask is None else tree_allowed(tree_mask, n_past)
            return masks[n_past]

        x = self.embed_tokens(input_ids)
        cache: list[KV] = []
        for i, layer in enumerate(self.layers):
            if i in skip:
                cache.append(past[i] if past is not None else _empty_kv(x, self.cfg))
                continue
            n_past = 0 if past is None else past[i][0].shape[2]
            x, kv = layer(x, rope, allowed(n_past), None if past is None else past[i])
            cache.append(kv)
        return self._logits(x[:, -1:] if last_only else x), cache


def tree_allowed(tree_mask: torch.Tensor, n_past: int) -> torch.Tensor:
    """(1, 1, t, n_past + t): every new token sees the whole cache, and the new tokens ``tree_mask`` allows."""
    t = tree_mask.shape[0]
    return torch.cat([torch.ones(t, n_past, dtype=torch.bool), tree_mask.to(torch.bool)], dim=1).reshape(1, 1, t, n_past + t)


def _empty_kv(x: torch.Tensor, cfg: LMConfig) -> KV:
    empty = x.new_zeros(x.shape[0], cfg.kv_heads, 0, cfg.hd)
    return empty, empty


def centred_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Encoder positions ``i - (n - 1) / 2`` for the n unpadded tokens of each row (padding at the end)."""
    n = attention_mask.to(torch.float32).sum(-1, keepdim=True)
    return torch.arange(attention_mask.shape[1], dtype=torch.float32).unsqueeze(0) - (n - 1) / 2


class EncoderDecoderLM(_Embedded):
    """Encoder-decoder LM; the decoder reads ``[BOS] ++ y`` and predicts ``y ++ [EOS]``."""

    kind = "encdec"

    def __init__(self, cfg: LMConfig):
        super().__init__()
        cfg.check()
        if cfg.enc_layers < 1 or cfg.dec_layers < 1:
            raise UserError(f"an encoder-decoder needs at least one encoder and one decoder layer, got {cfg.enc_layers} and {cfg.dec_layers}")
        self.cfg = cfg
        self._make_embeddings(cfg)
        self.encoder = nn.ModuleList(Layer(cfg, cfg.ffn) for _ in range(cfg.enc_layers))
        self.encoder_norm = RMSNorm(cfg.dim, cfg.eps)
        self.decoder = nn.ModuleList(Layer(cfg, cfg.ffn, cross=True) for _ in range(cfg.dec_layers))
        self._init(cfg.enc_layers + cfg.dec_layers)
        self.encoder_calls = 0  # counted so tests can check the source is read once per input

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output (batch, S, dim); padding (mask 0) must come after the tokens."""
        if not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
            self.encoder_calls += 1
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rope = rope_tables(centred_positions(attention_mask), self.cfg.hd, self.cfg.rope_theta)
        allowed = attention_mask.bool()[:, None, None, :]
        x = self.embed_tokens(input_ids)
        for layer in self.encoder:
            x, _ = layer(x, rope, allowed)
        return self.encoder_norm(x)

    def cross_kv(self, memory: torch.Tensor) -> list[KV]:
        """Each decoder layer's cross-attention keys and values, computed once per input."""
        return [layer.cross_attn.project_kv(memory) for layer in self.decoder]

    def decode_step(
        self,
        decoder_ids: torch.Tensor,
        cross: list[KV],
        attention_mask: torch.Tensor | None = None,
        past: list[KV] | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, list[KV]]:
        """Logits for ``decoder_ids (batch, t)`` following the cached ``past`` (only the last position's
        with ``last_only``), and the extended cache."""
        start = 0 if past is None else past[0][0].shape[2]
        b, t = decoder_ids.shape
        positions = (torch.arange(t) + start).unsqueeze(0).expand(b, t)
        rope = rope_tables(positions, self.cfg.hd, self.cfg.rope_theta)
        allowed = causal_allowed(t, start + t)
        cross_allowed = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        x = self.embed_tokens(decoder_ids)
        cache: list[KV] = []
        for i, layer in enumerate(self.decoder):
            x, kv = layer(x, rope, allowed, None if past is None else past[i], cross[i], cross_allowed)
            cache.append(kv)
        return self._logits(x[:, -1:] if last_only else x), cache

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, decoder_input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder logits for ``decoder_input_ids`` (default: just [BOS], the first generation step)."""
        if decoder_input_ids is None:
            decoder_input_ids = torch.full((input_ids.shape[0], 1), self.cfg.bos, dtype=torch.long)
        memory = self.encode(input_ids, attention_mask)
        return self.decode_step(decoder_input_ids, self.cross_kv(memory), attention_mask)[0]


# -- generation on torch -------------------------------------------------------


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    probs = (logits / temperature).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    use_cache: bool = True,
    stop_at_eos: bool = True,
) -> torch.Tensor:
    """New tokens (batch, <= max_new_tokens) after the source ``input_ids``; greedy at
    temperature 0, else sampled. A finished row (EOS) is padded with PAD.

    A decoder-only model takes the source as its prompt (rows of equal length: padding
    is not supported in its prompt); an encoder-decoder encodes it once and decodes from [BOS].
    ``use_cache=False`` recomputes every step from scratch (the reference for the cache)."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed) if temperature > 0 else None
    b = input_ids.shape[0]
    if isinstance(model, EncoderDecoderLM):
        cross = model.cross_kv(model.encode(input_ids, attention_mask))

        def step(seq: torch.Tensor, past):
            if not use_cache:
                return model.decode_step(seq, cross, attention_mask)[0][:, -1], None
            feed = seq if past is None else seq[:, -1:]
            logits, past = model.decode_step(feed, cross, attention_mask, past, last_only=True)
            return logits[:, -1], past

        seq = torch.full((b, 1), cfg.bos, dtype=torch.long)
    else:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise UserError("decoder-only generation takes prompts of equal length (no padding); generate one row at a time")

        def step(seq: torch.Tensor, past):
            if not use_cache:
                return model.step(seq)[0][:, -1], None
            feed = seq if past is None else seq[:, -1:]
            logits, past = model.step(feed, past, last_only=True)
            return logits[:, -1], past

        seq = input_ids
    prefix = seq.shape[1]
    done = torch.zeros(b, dtype=torch.bool)
    past = None
    for _ in range(max_new_tokens):
        logits, past = step(seq, past)
        nxt = _pick(logits, temperature, gen)
        nxt = torch.where(done.unsqueeze(1), torch.full_like(nxt, cfg.pad), nxt)
        seq = torch.cat([seq, nxt], dim=1)
        done |= nxt.squeeze(1) == cfg.eos
        if stop_at_eos and bool(done.all()):
            break
    return seq[:, prefix:]


# -- building ------------------------------------------------------------------


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def student_config(teacher: LMConfig, enc_layers: int | None = None, dec_layers: int | None = None, match_params: bool = True) -> LMConfig:
    """The encoder-decoder for a decoder-only ``teacher``: 2/3 of its layers in the encoder,
    1/3 in the decoder (unless given), and, with ``match_params``, an FFN narrowed (to a
    multiple of 8) so the student has no more parameters than the teacher despite its
    cross-attention."""
    total = teacher.layers
    enc = enc_layers if enc_layers is not None else max(1, round(2 * total / 3))
    dec = dec_layers if dec_layers is not None else max(1, total - enc)
    ffn = teacher.ffn
    if match_params:
        attn = teacher.dim * teacher.hd * (2 * teacher.heads + 2 * teacher.kv_heads)
        per_layer_ffn = 3 * teacher.dim
        teacher_body = total * (attn + per_layer_ffn * teacher.ffn)
        student_fixed = (enc + dec) * attn + dec * (attn + teacher.dim)  # cross-attention and its norm
        budget = teacher_body - student_fixed
        ffn = (budget // ((enc + dec) * per_layer_ffn)) // 8 * 8
        if ffn < 8:
            raise UserError(
                f"an encoder-decoder with {enc}+{dec} layers cannot match the teacher's parameters ({total} layers); "
                "set encoder_layers / decoder_layers, or match_params: false"
            )
    return replace(teacher, layers=0, enc_layers=enc, dec_layers=dec, ffn=int(ffn))


def init_student_from_teacher(student: EncoderDecoderLM, teacher: DecoderLM) -> None:
    """Start the student from the teacher: embeddings and final norm; the encoder from the
    teacher's first layers and the decoder from its last; cross-attention from the same
    layer's self-attention; FFNs keep the teacher's neurons with the largest weight norms."""
    with torch.no_grad():
        student.embed_tokens.weight.copy_(teacher.embed_tokens.weight)
        student.norm.weight.copy_(teacher.norm.weight)
        if student.lm_head is not None and teacher.lm_head is not None:
            student.lm_head.weight.copy_(teacher.lm_head.weight)
        n, enc, dec = len(teacher.layers), len(student.encoder), len(student.decoder)
        enc_src = [teacher.layers[min(i, n - 1)] for i in range(enc)]
        dec_src = [teacher.layers[max(n - dec + i, 0)] for i in range(dec)]
        for dst, src in zip(student.encoder, enc_src):
            _copy_layer(dst, src)
        for dst, src in zip(student.decoder, dec_src):
            _copy_layer(dst, src)
            dst.cross_attn.load_state_dict({k: v for k, v in src.self_attn.state_dict().items() if not k.endswith("bias")}, strict=False)
            dst.cross_layernorm.weight.copy_(src.input_layernorm.weight)


def _copy_layer(dst: Layer, src: Layer) -> None:
    dst.input_layernorm.load_state_dict(src.input_layernorm.state_dict())
    dst.self_attn.load_state_dict(src.self_attn.state_dict())
    dst.post_attention_layernorm.load_state_dict(src.post_attention_layernorm.state_dict())
    keep = min(dst.mlp.gate_proj.out_features, src.mlp.gate_proj.out_features)
    score = src.mlp.down_proj.weight.norm(dim=0) * src.mlp.up_proj.weight.norm(dim=1)
    idx = score.topk(keep).indices.sort().values
    dst.mlp.gate_proj.weight[:keep].copy_(src.mlp.gate_proj.weight[idx])
    dst.mlp.up_proj.weight[:keep].copy_(src.mlp.up_proj.weight[idx])
    dst.mlp.down_proj.weight[:, :keep].copy_(src.mlp.down_proj.weight[:, idx])


def config_dict(cfg: LMConfig) -> dict:
    return asdict(cfg)


# -- zoo entries that rebuild a model from its config (the builders of derived artifacts) --

_TEXT_INPUTS = [
    TensorSpec(name="input_ids", shape=["batch", "seq"], dtype="int64", low=4, high=32),
    TensorSpec(name="attention_mask", shape=["batch", "seq"], dtype="int64", low=1, high=2),
]


@register_model(inputs=_TEXT_INPUTS, task="seq2seq")
def decoder_lm(**config) -> DecoderLM:
    """Decoder-only LM (Llama layout) from an LMConfig's fields; what a distilled or converted teacher rebuilds from."""
    return DecoderLM(LMConfig(**config))


@register_model(inputs=_TEXT_INPUTS, task="seq2seq")
def encdec_lm(**config) -> EncoderDecoderLM:
    """Encoder-decoder LM from an LMConfig's fields; what a distill.encdec student rebuilds from."""
    return EncoderDecoderLM(LMConfig(**config))
