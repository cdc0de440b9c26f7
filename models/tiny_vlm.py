"""A small vision-language model: a ViT encoder feeding a causal language model with rotary positions.

Why it exists: visual token pruning (FastV, FEATHER) is about how a decoder LM
with rotary position embeddings (RoPE) reads image tokens, and the project needs
one it can train in minutes on a CPU to measure that. The layout follows
LLaVA-style models at toy scale:

- vision: a small conv stem (three strided convs, one token per ``patch`` x
  ``patch`` pixels) + fixed 2-D sin-cos and learned position embeddings +
  ``vision_depth`` bidirectional pre-norm transformer blocks, then a linear
  projector to the LM width; image tokens in row-major order. (A single linear
  patch projection left the content features so small next to the positions
  that the LM learned to ignore the image within a CPU training budget; with
  one encoder block instead of two, localization stalled near 58%.)
- language model: token embedding, ``depth`` pre-norm causal blocks with RoPE
  (positions are explicit ids, so pruned image tokens keep theirs), a final
  norm and a head over the vocabulary of :mod:`edgekit.models.shapes_vqa`.
- RoPE scaled to the short sequence (what FastV's positional bias comes
  from): base 500 instead of LLaMA's 10000, and one head of 64 channels.
  LLaVA reads 576 image tokens at base 10000 with heads of 128, so about 70%
  of the frequency pairs turn by more than a radian across the image, and the
  score of aligned queries and keys decays smoothly with distance (RoPE's
  long-term decay). At 72 tokens that takes base ~470 (10000 gives 46%), and
  with heads of 16 (8 frequency pairs) the "decay" is an oscillation, not a
  decay; 32 pairs make it smooth again.
- the sequence is [image tokens] + [question tokens]; the output is the
  next-token logits at the last position, ``(batch, vocab)``: the answer word.
  So it trains and evaluates as a classifier (``train.supervised``, ``top1``).

Token pruning hooks in through ``token_stages`` (empty by default): a stage
registered under key ``str(L)`` scores the image tokens with block ``L - 1``
(the last one that sees them all) and the tokens it drops never reach block
``L``. ``compress/tokens/feather.py`` fills it; blocks expose
:meth:`LMBlock.image_scores` for that.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgekit.artifact import TensorSpec
from edgekit.errors import UserError
from edgekit.models.registry import register_model
from edgekit.models.shapes_vqa import QUESTION_LENGTH, VOCAB_SIZE


def _sincos_2d(rows: int, cols: int, dim: int) -> torch.Tensor:
    """(1, rows * cols, dim): half the channels encode the row, half the column, in sin-cos pairs."""
    quarter = dim // 4
    freq = 1.0 / 100.0 ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1))
    r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float32), torch.arange(cols, dtype=torch.float32), indexing="ij")
    parts = [f(x.reshape(-1, 1) * freq) for x in (r, c) for f in (torch.sin, torch.cos)]
    out = torch.cat(parts, dim=1)
    return F.pad(out, (0, dim - out.shape[1])).unsqueeze(0)


def _rotate(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x (batch, heads, T, head_dim)`` at positions ``pos (batch, T)`` (rotate-half layout)."""
    angles = pos.to(inv_freq.dtype).unsqueeze(-1) * inv_freq  # (batch, T, head_dim / 2)
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).unsqueeze(1)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Multi-head self-attention; causal with RoPE in the LM, plain and bidirectional in the encoder."""

    def __init__(self, dim: int, heads: int, causal: bool, rope_base: float | None):
        super().__init__()
        if dim % heads or (dim // heads) % 2:
            raise UserError(f"the width {dim} must split into {heads} heads of an even size; change dim or heads")
        self.dim, self.heads, self.head_dim, self.causal = dim, heads, dim // heads, causal
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.rope = rope_base is not None
        if self.rope:
            inv_freq = 1.0 / rope_base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)
            self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _split(self, z: torch.Tensor) -> torch.Tensor:
        return z.reshape(z.shape[0], z.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        b, t = x.shape[0], x.shape[1]
        q, k, v = (self._split(z) for z in self.qkv(x).split(self.dim, dim=-1))
        if self.rope:
            q, k = _rotate(q, pos, self.inv_freq), _rotate(k, pos, self.inv_freq)
        att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        if self.causal:  # kept tokens stay in their original order, so causal by index is causal by position
            future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            att = att.masked_fill(future, float("-inf"))
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, self.dim)
        return self.proj(y)

    def last_query_scores(self, x: torch.Tensor, pos: torch.Tensor, n_img: int, rope: bool) -> torch.Tensor:
        """Softmax attention of the last token's query over the first ``n_img`` keys, mean over heads: (batch, n_img).

        ``x`` is the normed block input. ``rope=False`` scores the same query and
        keys without rotation (FEATHER's criterion)."""
        w_q, w_k = self.qkv.weight[: self.dim], self.qkv.weight[self.dim : 2 * self.dim]
        q = self._split(F.linear(x[:, -1:], w_q))  # (batch, heads, 1, head_dim)
        k = self._split(F.linear(x[:, :n_img], w_k))  # (batch, heads, n_img, head_dim)
        if rope and self.rope:
            q, k = _rotate(q, pos[:, -1:], self.inv_freq), _rotate(k, pos[:, :n_img], self.inv_freq)
        att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        return att.softmax(-1).mean(1).squeeze(1)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LMBlock(nn.Module):
    """Pre-norm transformer block; ``forward(hidden (batch, T, dim), pos (batch, T))``."""

    def __init__(self, dim: int, heads: int, hidden: int, causal: bool = True, rope_base: float | None = 10000.0):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal, rope_base)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = MLP(dim, hidden)

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), pos)
        return x + self.mlp(self.mlp_norm(x))

    def image_scores(self, x: torch.Tensor, pos: torch.Tensor, n_img: int, rope: bool) -> torch.Tensor:
        """How much the last token attends to each of the first ``n_img`` tokens in this block: (batch, n_img)."""
        return self.attn.last_query_scores(self.attn_norm(x), pos, n_img, rope)


def _keep_image_tokens(h: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor, n_img: int):
    """Keep image tokens ``keep (batch, k)`` (sorted indices < n_img) and every text token after them."""
    b, t = pos.shape
    text = torch.arange(n_img, t, device=pos.device).unsqueeze(0).expand(b, t - n_img)
    index = torch.cat([keep, text], dim=1)
    h = h.gather(1, index.unsqueeze(-1).expand(b, index.shape[1], h.shape[-1]))
    return h, pos.gather(1, index)


class TinyVLM(nn.Module):
    """ViT encoder + causal RoPE LM answering a question about an image; see the module docstring."""

    def __init__(
        self,
        image_size: int = 64,
        patch: int = 8,
        vision_dim: int = 64,
        vision_depth: int = 2,
        dim: int = 64,
        depth: int = 8,
        heads: int = 1,
        mlp_ratio: float = 2.0,
        vocab: int = VOCAB_SIZE,
        rope_base: float = 500.0,
    ):
        super().__init__()
        if image_size % patch:
            raise UserError(f"image_size {image_size} must be a multiple of patch {patch}")
        if depth < 2:
            raise UserError(f"the language model needs at least 2 blocks for token pruning stages, got depth={depth}")
        self.rows = self.cols = image_size // patch
        self.num_image_tokens = self.rows * self.cols
        if patch < 4 or patch & (patch - 1):
            raise UserError(f"patch {patch} must be a power of two of at least 4 (the stem halves the image twice)")
        stem = max(vision_dim // 4, 8)
        # a small conv stem instead of one linear patch projection: each token sees its whole neighbourhood
        # (an object spans about 2 x 2 patches), which trains far faster on a CPU budget
        self.patch_embed = nn.Sequential(
            nn.Conv2d(3, stem, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(stem, 2 * stem, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * stem, vision_dim, patch // 4, stride=patch // 4),
        )
        self.patch_norm = nn.LayerNorm(vision_dim)  # content features at unit scale, not drowned by the positions
        # fixed 2-D sin-cos positions (as in MAE) plus a learned part: where a token is must be plain from the start
        self.register_buffer("vision_grid_pos", _sincos_2d(self.rows, self.cols, vision_dim), persistent=False)
        self.vision_pos = nn.Parameter(torch.zeros(1, self.num_image_tokens, vision_dim))
        self.vision_blocks = nn.ModuleList(
            LMBlock(vision_dim, heads, int(vision_dim * mlp_ratio), causal=False, rope_base=None) for _ in range(vision_depth)
        )
        self.vision_norm = nn.LayerNorm(vision_dim)
        self.projector = nn.Linear(vision_dim, dim)
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(LMBlock(dim, heads, int(dim * mlp_ratio), rope_base=rope_base) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        self.token_stages = nn.ModuleDict()  # "L" -> pruning stage before LM block L (see compress/tokens/feather.py)
        nn.init.normal_(self.vision_pos, std=0.02)

    @property
    def image_grid(self) -> tuple[int, int]:
        """(rows, cols) of the image-token grid; token i sits at row i // cols."""
        return self.rows, self.cols

    def token_blocks(self) -> list[nn.Module]:
        """The LM blocks, in order (what token pruning shrinks)."""
        return list(self.blocks)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed((pixel_values - 0.5) * 4.0).flatten(2).transpose(1, 2)
        x = self.patch_norm(x) + 0.5 * self.vision_grid_pos + self.vision_pos
        for block in self.vision_blocks:
            x = block(x)
        return self.projector(self.vision_norm(x))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.encode_image(pixel_values), self.embed(input_ids)], dim=1)
        b, t = h.shape[0], h.shape[1]
        pos = torch.arange(t, device=h.device).unsqueeze(0).expand(b, t)
        n_img = self.num_image_tokens
        stages = {int(key): stage for key, stage in self.token_stages.items()}
        for i, block in enumerate(self.blocks):
            stage = stages.get(i + 1)
            keep = stage(block, h, pos, n_img) if stage is not None else None
            h = block(h, pos)
            if keep is not None:
                h, pos = _keep_image_tokens(h, pos, keep, n_img)
                n_img = keep.shape[1]
        return self.head(self.norm(h[:, -1]))


def _inputs(image_size: int) -> list[TensorSpec]:
    return [
        TensorSpec(name="pixel_values", shape=["batch", 3, image_size, image_size], layout="NCHW", low=0.0, high=1.0),
        TensorSpec(name="input_ids", shape=["batch", "qlen"], dtype="int64", low=0, high=VOCAB_SIZE),
    ]


@register_model(inputs=_inputs(64), task="classification", dims={"batch": 1, "qlen": QUESTION_LENGTH})
def tiny_vlm(**kwargs) -> TinyVLM:
    """Toy VLM: 64x64 image -> 8x8 tokens, conv stem + 2-block ViT, 8-block RoPE LM (width 64, one head); answers shapes_vqa questions."""
    return TinyVLM(**kwargs)


@register_model(inputs=_inputs(32), task="classification", dims={"batch": 1, "qlen": QUESTION_LENGTH})
def tiny_vlm_micro(**kwargs) -> TinyVLM:
    """Test-size VLM: 32x32 image -> 8x8 tokens of 4 px, conv stem + 1-block ViT, 4-block RoPE LM (width 32, one head)."""
    args = {"image_size": 32, "patch": 4, "vision_dim": 32, "vision_depth": 1, "dim": 32, "depth": 4, "heads": 1} | kwargs
    return TinyVLM(**args)
