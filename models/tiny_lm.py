"""A small decoder-only causal language model over bytes (vocabulary 256).

Token embedding (tied with the output head) + learned positions, pre-RMSNorm
blocks of causal multi-head self-attention and an FFN (a :class:`DenseFFN`, or
a :class:`BlockFFN` with ``experts > 0``), a final RMSNorm. ``forward(input_ids)``
gives logits ``(batch, T, 256)`` and exports to ONNX with the torchscript exporter;
:meth:`TinyLM.step` decodes with a key/value cache and :meth:`TinyLM.generate`
is greedy decoding on top of it. Every FFN call goes through the FFN module, so
a runtime can swap ``BlockFFN.forward`` for a sparse kernel.

The zoo variants use ReLU FFNs: a ReLU FFN is already activation-sparse, which
is what converting it into blocks of neurons (MoEfication, Zhang et al. 2022)
builds on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgekit.artifact import TensorSpec
from edgekit.errors import UserError
from edgekit.models.blockffn import BlockFFN, DenseFFN, RMSNorm
from edgekit.models.byte_text import VOCAB
from edgekit.models.registry import register_model

_INPUTS = [TensorSpec(name="input_ids", shape=["batch", "seq"], dtype="int64", low=0, high=VOCAB)]

KV = tuple[torch.Tensor, torch.Tensor]  # keys, values: (batch, heads, T, head_dim)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise UserError(f"the model width {dim} must be a multiple of the head count {heads}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, past: KV | None = None, tree_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, KV]:
        b, t = x.shape[0], x.shape[1]
        q, k, v = (z.reshape(b, t, self.heads, self.head_dim).transpose(1, 2) for z in self.qkv(x).split(self.dim, dim=-1))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        # query i sits at absolute position (keys - t + i) and sees the keys up to it
        n_keys = k.shape[2]
        q_pos = torch.arange(t, device=x.device) + (n_keys - t)
        allowed = torch.arange(n_keys, device=x.device).unsqueeze(0) <= q_pos.unsqueeze(1)
        if tree_mask is not None:  # speculative tree: the new tokens see the cache and their own ancestors
            allowed = torch.cat([allowed[:, : n_keys - t], tree_mask.to(torch.bool)], dim=1)
        att = att.masked_fill(~allowed, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, self.dim)
        return self.proj(y), (k, v)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: nn.Module):
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ffn_norm = RMSNorm(dim)
        self.ffn = ffn

    def forward(self, x: torch.Tensor, past: KV | None = None, tree_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, KV]:
        a, kv = self.attn(self.attn_norm(x), past, tree_mask)
        x = x + a
        return x + self.ffn(self.ffn_norm(x)), kv


class TinyLM(nn.Module):
    """Byte-level causal LM; see the module docstring."""

    tokenizer = "bytes"

    def __init__(
        self,
        dim: int = 64,
        layers: int = 2,
        heads: int = 4,
        ffn: int = 256,
        activation: str = "relu",
        max_seq: int = 512,
        experts: int = 0,
        vocab: int = VOCAB,
    ):
        super().__init__()
        if experts and ffn % experts:
            raise UserError(f"ffn {ffn} must split into {experts} equal experts; pick experts dividing {ffn}")
        self.dim, self.max_seq, self.vocab = dim, max_seq, vocab
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_seq, dim)

        def make_ffn() -> nn.Module:
            if experts:
                return BlockFFN(dim, experts, ffn // experts, activation)
            return DenseFFN(dim, ffn, activation)

        self.blocks = nn.ModuleList(Block(dim, heads, make_ffn()) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self._init_weights(layers)

    def _init_weights(self, layers: int) -> None:
        # GPT-2 style: N(0, 0.02), residual outputs scaled down by depth
        resid = 0.02 / math.sqrt(2 * layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                continue
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif name.endswith(("proj.weight", "fc2.weight", ".down")):
                nn.init.normal_(p, std=resid)
            else:
                nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, BlockFFN):
                nn.init.ones_(m.router.bias)  # every expert starts active

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.step(input_ids)[0]

    def step(
        self,
        input_ids: torch.Tensor,
        past: list[KV] | None = None,
        positions: torch.Tensor | None = None,
        tree_mask: torch.Tensor | None = None,
        skip: frozenset[int] | set[int] = frozenset(),
    ) -> tuple[torch.Tensor, list[KV]]:
        """Logits for ``input_ids (batch, t)`` that follow the cached ``past`` (one (k, v) per block),
        and the cache extended by these tokens. Speculative decoding passes ``positions (t,)``,
        ``tree_mask (t, t)`` (which new token sees which; default causal) and ``skip`` (blocks run as
        identity, their cache passed through), as in :meth:`DecoderLM.step <edgekit.models.encdec.DecoderLM.step>`."""
        start = 0 if past is None else past[0][0].shape[2]
        t = input_ids.shape[1]
        if positions is None:
            positions = torch.arange(t, device=input_ids.device) + start
        if not torch.jit.is_tracing():  # a traced size is a tensor: no Python checks on it
            end = int(positions.max()) + 1 if t else start
            if end > self.max_seq:
                raise UserError(f"this model handles at most {self.max_seq} tokens, asked for {end}; shorten the prompt or the generation")
        x = self.embed(input_ids) + self.pos(positions)
        cache: list[KV] = []
        for i, block in enumerate(self.blocks):
            if i in skip:
                empty = x.new_zeros(x.shape[0], block.attn.heads, 0, block.attn.head_dim)
                cache.append(past[i] if past is not None else (empty, empty))
                continue
            x, kv = block(x, None if past is None else past[i], tree_mask)
            cache.append(kv)
        return self.norm(x) @ self.embed.weight.t(), cache

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding: the prompt in one step, then one token per step from the cache.
        Returns the prompt followed by ``max_new_tokens`` tokens."""
        if input_ids.ndim != 2 or input_ids.shape[1] < 1:
            raise UserError(f"generate needs input_ids of shape (batch, T) with T >= 1, got {list(input_ids.shape)}")
        if max_new_tokens <= 0:
            return input_ids
        if input_ids.shape[1] + max_new_tokens - 1 > self.max_seq:  # the last new token is never fed back
            raise UserError(
                f"this model handles at most {self.max_seq} tokens; a prompt of {input_ids.shape[1]} plus {max_new_tokens} new tokens "
                "needs more; shorten the prompt or the generation"
            )
        out = [input_ids]
        logits, past = self.step(input_ids)
        for i in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            if i + 1 < max_new_tokens:
                logits, past = self.step(nxt, past)
        return torch.cat(out, dim=1)


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of predicting token t+1 from positions <= t (nats per byte)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction=reduction)


@register_model(inputs=_INPUTS, task="lm", dims={"batch": 1, "seq": 128})
def tiny_lm_micro(activation: str = "relu", experts: int = 0, max_seq: int = 256) -> TinyLM:
    """Byte LM for tests: width 64, 2 layers, 4 heads, FFN 256 (~0.1 M params)."""
    return TinyLM(dim=64, layers=2, heads=4, ffn=256, activation=activation, max_seq=max_seq, experts=experts)


@register_model(inputs=_INPUTS, task="lm", dims={"batch": 1, "seq": 128})
def tiny_lm_small(activation: str = "relu", experts: int = 0, max_seq: int = 512) -> TinyLM:
    """Byte LM: width 256, 4 layers, 4 heads, ReLU FFN 1024 (~3.3 M params)."""
    return TinyLM(dim=256, layers=4, heads=4, ffn=1024, activation=activation, max_seq=max_seq, experts=experts)
