"""A DeiT/ViT-style image classifier written for token compression.

Conv patch embedding, a CLS token, learned positions, pre-LN blocks (multi-head
self-attention + GELU MLP) and a linear head on the final CLS token. Its
attention takes an optional per-token *size* vector (how many original patches
a token stands for): the logits get ``+ log(size)`` per key, ToMe's
proportional attention, so a merged token weighs as much as the patches it
replaced. ``token_blocks()`` lists the blocks for the token passes
(``tokens.transform``) and the FLOPs accounting.

A block returns its hidden states; a block the token pass replaced returns
``(hidden, sizes)``, and the forward loop carries ``sizes`` on to the next one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edgekit.artifact import TensorSpec
from edgekit.models.registry import register_model


def image_inputs(size: int) -> list[TensorSpec]:
    return [TensorSpec(name="pixel_values", shape=["batch", 3, size, size], dtype="float32", layout="NCHW", low=0, high=1)]


def size_bias(sizes: torch.Tensor | None) -> torch.Tensor | None:
    """Additive attention bias ``log(size)`` per key, shaped (batch, 1, 1, keys); None when every size is 1."""
    return None if sizes is None else torch.log(sizes)[:, None, None, :]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values, each (batch, heads, tokens, head_dim)."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.split(x)
        logits = (q @ k.transpose(-2, -1)) * self.scale
        bias = size_bias(sizes)
        if bias is not None:
            logits = logits + bias
        out = logits.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).flatten(2))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), sizes)
        return x + self.mlp(self.norm2(x))


def run_blocks(blocks, x: torch.Tensor) -> torch.Tensor:
    """Call the blocks in order, carrying token sizes from compressed blocks (which return ``(x, sizes)``)."""
    sizes = None
    for block in blocks:
        out = block(x, sizes)
        x, sizes = out if isinstance(out, tuple) else (out, sizes)
    return x


def conv_stem(in_channels: int, dim: int, patch: int) -> nn.Sequential:
    """Stride-2 3x3 conv + BN + ReLU stages down to the patch grid, then a 1x1 projection to ``dim``.

    Early convolutions make a small ViT trainable from scratch on little data
    (Xiao et al. 2021, "Early Convolutions Help Transformers See Better"); the
    tokens are still one per ``patch`` x ``patch`` cell.
    """
    layers: list[nn.Module] = []
    c, width = in_channels, max(dim // 4, 16)
    for _ in range(int(math.log2(patch))):
        layers += [nn.Conv2d(c, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        c, width = width, min(width * 2, dim)
    layers.append(nn.Conv2d(c, dim, 1))
    return nn.Sequential(*layers)


class ViT(nn.Module):
    def __init__(self, image_size: int = 64, patch: int = 8, dim: int = 128, depth: int = 6, heads: int = 4,
                 mlp_ratio: float = 4.0, num_classes: int = 6, in_channels: int = 3, stem: str = "patch"):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
        if stem == "conv" and patch & (patch - 1):
            raise ValueError(f"a conv stem needs a power-of-two patch, not {patch}")
        self.image_size, self.patch = image_size, patch
        # "patch": one patch x patch conv (classic ViT); "conv": a small convolutional stem
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch) if stem == "patch" else conv_stem(in_channels, dim, patch)
        tokens = (image_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        self._init()

    def _init(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        if isinstance(self.patch_embed, nn.Conv2d):
            fan_in = self.patch_embed.in_channels * self.patch * self.patch
            nn.init.trunc_normal_(self.patch_embed.weight, std=math.sqrt(1 / fan_in))

    def token_blocks(self) -> list[nn.Module]:
        return list(self.blocks)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = run_blocks(self.blocks, self.embed(pixel_values))
        return self.head(self.norm(x[:, 0]))


@register_model(inputs=image_inputs(64), task="classification", dims={"batch": 1})
def vit_shapes(num_classes: int = 6, image_size: int = 64) -> ViT:
    """ViT for shapes_cls: 64x64, conv stem to 8x8 patches (64 tokens + CLS), dim 96, depth 6, 4 heads (~0.8 M params)."""
    return ViT(image_size=image_size, patch=8, dim=96, depth=6, heads=4, num_classes=num_classes, stem="conv")


@register_model(inputs=image_inputs(32), task="classification", dims={"batch": 1})
def vit_micro(num_classes: int = 6, image_size: int = 32) -> ViT:
    """A tiny ViT for tests: 32x32, patch 4 (64 patches + CLS), dim 32, depth 4, 2 heads."""
    return ViT(image_size=image_size, patch=4, dim=32, depth=4, heads=2, num_classes=num_classes)


@register_model(inputs=image_inputs(64), task="classification", dims={"batch": 1})
def vit_digits(num_classes: int = 10, image_size: int = 64) -> ViT:
    """ViT for digits_canvas: 64x64, conv stem to 8x8 patches (64 + CLS tokens), dim 64, depth 6, 4 heads (~0.33 M params)."""
    return ViT(image_size=image_size, patch=8, dim=64, depth=6, heads=4, num_classes=num_classes, stem="conv")


@register_model(inputs=image_inputs(224), task="classification", dims={"batch": 1})
def deit_small(num_classes: int = 1000, image_size: int = 224) -> ViT:
    """DeiT-S shape: 224x224, patch 16 (196 + CLS tokens), dim 384, depth 12, 6 heads (~22 M params; random weights)."""
    return ViT(image_size=image_size, patch=16, dim=384, depth=12, heads=6, num_classes=num_classes)
