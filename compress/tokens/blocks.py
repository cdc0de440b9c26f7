"""One block interface over the ViT kinds token compression supports, and the
compressed block built on it.

:func:`view_of` maps a transformer block (edgekit's :class:`~edgekit.models.vit.Block`
or a Hugging Face ``ViTLayer``) to a :class:`BlockView`: its layer norms,
query/key/value, output projection and MLP, using the block's own weights. So
:class:`TokenBlock` is written once: it runs the block with proportional
attention (logits + log(size) per key) and, between attention and MLP (where
ToMe merges), compresses the tokens with a token matrix built from this
block's keys (similarity) and CLS attention (importance). The MLP and every
later block then run on fewer tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from edgekit.errors import UserError

from . import matrices

METHODS = ("transform", "tome", "prune")
ANCHORS = ("attention", "matching")  # transform: anchors by CLS attention, or the tokens bipartite matching keeps


@dataclass
class BlockView:
    dim: int
    hidden: int  # MLP width
    heads: int
    head_dim: int
    scale: float
    norm1: Callable
    qkv: Callable  # x -> (q, k, v), each (batch, heads, tokens, head_dim)
    proj: Callable  # (batch, tokens, heads * head_dim) -> (batch, tokens, dim)
    norm2: Callable
    mlp: Callable


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, _ = x.shape
    return x.reshape(b, n, heads, -1).transpose(1, 2)


def view_of(block: nn.Module) -> BlockView:
    """The common view of a supported transformer block, or a UserError naming its class."""
    from edgekit.models.vit import Block

    if isinstance(block, Block):
        a = block.attn
        return BlockView(a.proj.in_features, block.mlp[0].out_features, a.heads, a.head_dim, a.scale,
                         block.norm1, a.split, a.proj, block.norm2, block.mlp)
    kind = type(block).__name__
    if kind == "ViTLayer" and hasattr(block.attention, "q_proj"):
        a = block.attention
        h = a.num_attention_heads

        def qkv(x):
            return _heads(a.q_proj(x), h), _heads(a.k_proj(x), h), _heads(a.v_proj(x), h)

        return BlockView(a.o_proj.out_features, block.mlp.fc1.out_features, h, a.head_dim, a.scaling,
                         block.layernorm_before, qkv, a.o_proj, block.layernorm_after, block.mlp)
    raise UserError(f"token compression does not know the transformer block {kind}; it supports edgekit's ViT and Hugging Face ViT (model_type vit)")


class TokenBlock(nn.Module):
    """A transformer block that takes and returns ``(x, sizes)`` and removes ``remove`` tokens after its attention."""

    def __init__(self, block: nn.Module, method: str = "transform", remove: int = 0, top_m: int = 2, temperature: float = 0.1,
                 anchors: str = "matching"):
        super().__init__()
        if method not in METHODS:
            raise UserError(f"unknown token method {method!r}; use one of {', '.join(METHODS)}")
        view_of(block)  # fail now for an unsupported block
        self.block = block
        if anchors not in ANCHORS:
            raise UserError(f"unknown anchor rule {anchors!r}; use one of {', '.join(ANCHORS)}")
        self.method, self.remove, self.top_m, self.temperature, self.anchors = method, int(remove), int(top_m), float(temperature), anchors

    def extra_repr(self) -> str:
        return f"method={self.method}, remove={self.remove}"

    def forward(self, x: torch.Tensor, sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        v = view_of(self.block)
        q, k, val = v.qkv(v.norm1(x))
        logits = (q @ k.transpose(-2, -1)) * v.scale
        if sizes is not None:
            logits = logits + torch.log(sizes)[:, None, None, :]
        attn = logits.softmax(-1)
        x = x + v.proj((attn @ val).transpose(1, 2).flatten(2))
        if self.remove > 0:
            t = self.matrix(k.mean(1), attn[:, :, 0, 1:].mean(1), x.shape[1] - 1)
            x, sizes = matrices.apply(t, x, sizes)
        return x + v.mlp(v.norm2(x)), sizes

    def matrix(self, metric: torch.Tensor, importance: torch.Tensor, patches: int) -> torch.Tensor:
        keep = patches - self.remove
        if self.method == "prune":
            return matrices.prune_matrix(importance, keep)
        if self.method == "tome":
            return matrices.tome_matrix(metric, self.remove)
        if self.anchors == "matching":
            importance = matrices.matching_scores(metric)
        return matrices.transform_matrix(metric, importance, keep, self.top_m, self.temperature)
