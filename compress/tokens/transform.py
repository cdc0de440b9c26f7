"""``tokens.transform``: training-free token compression inside a ViT's blocks.

Every block is replaced by a :class:`~.blocks.TokenBlock` that runs the same
weights with proportional attention and, after its attention, removes the
number of tokens the schedule gives that layer by an explicit token matrix
``X' = T X`` (:mod:`.matrices`): Token Transforming's many-to-many T
(``method: transform``), ToMe's bipartite merging (``tome``) or top-k pruning
by CLS attention (``prune``).

The schedule is either explicit (``layers: {index: tokens to remove, or a
keep ratio < 1}``) or solved from ``flops_cut``: a constant real rate r of
tokens removed per layer from ``start_layer`` on (layer l removes
``round((l+1) r) - round(l r)`` tokens, so the cut is not limited to whole
tokens per layer), with r the smallest rate whose analytic block MACs —
attention, MLP and the method's own similarity and T products — fall by at
least ``flops_cut``. A layer removes at most half its patch tokens (ToMe's
bipartite limit, kept for every method so all three share one schedule
shape). The token counts are fixed, so the model exports with them.
"""

from __future__ import annotations

import copy
from typing import Literal

from pydantic import Field, model_validator

from edgekit.artifact import Artifact
from edgekit.errors import UserError
from edgekit.passes import Pass, PassConfig, PassContext


class TokenTransformConfig(PassConfig):
    method: Literal["transform", "tome", "prune"] = Field(
        "transform", description="transform: Token Transforming (many-to-many T); tome: bipartite merging; prune: keep top-k by CLS attention"
    )
    flops_cut: float | None = Field(0.4, gt=0, lt=0.95, description="share of the transformer blocks' MACs to remove; the per-layer schedule is solved for it")
    layers: dict[int, float] | None = Field(
        None, description="explicit schedule instead of flops_cut: {layer index: tokens to remove (>= 1) or share of patch tokens to keep (< 1)}"
    )
    start_layer: int = Field(0, ge=0, description="first layer that removes tokens (flops_cut schedules)")
    top_m: int = Field(2, ge=1, description="transform: anchors each removed token spreads over")
    temperature: float = Field(0.1, gt=0, description="transform: softmax temperature over cosine similarity to the anchors")
    anchors: Literal["attention", "matching"] = Field(
        "matching", description="transform: anchors = top tokens by CLS attention, or the tokens ToMe's bipartite matching keeps"
    )

    def cost_key(self) -> str:
        """The method name :func:`block_macs` prices."""
        return "transform:matching" if self.method == "transform" and self.anchors == "matching" else self.method

    @model_validator(mode="after")
    def _one_schedule(self):
        if self.layers is not None:
            if "flops_cut" in self.model_fields_set and self.flops_cut is not None:
                raise ValueError("set flops_cut or layers, not both")
            self.flops_cut = None
        elif self.flops_cut is None:
            raise ValueError("set flops_cut (e.g. 0.4) or layers")
        return self


# -- schedule -------------------------------------------------------------------

def block_macs(n_in: int, n_out: int, dim: int, hidden: int, heads: int, method: str | None = None) -> int:
    """Analytic MACs of one block: attention on ``n_in`` tokens, MLP on ``n_out``, plus the method's T cost.

    ``method``: prune, tome, transform (anchors by attention) or transform:matching.
    """
    macs = 4 * n_in * dim * dim + 2 * n_in * n_in * dim + 2 * n_out * dim * hidden
    if method is not None and n_out < n_in:
        c, n = dim // heads, n_in - 1
        bipartite, to_anchors = ((n + 1) // 2) * (n // 2) * c, n * (n_out - 1) * c
        similarity = {"prune": 0, "tome": bipartite, "transform": to_anchors, "transform:matching": bipartite + to_anchors}[method]
        macs += similarity + n_out * n_in * dim  # building T, then (T * s) @ x
    return macs


def schedule_macs(tokens: int, removes: list[int], dim: int, hidden: int, heads: int, method: str | None = None) -> int:
    total, n = 0, tokens
    for r in removes:
        total += block_macs(n, n - r, dim, hidden, heads, method)
        n -= r
    return total


def rate_schedule(tokens: int, depth: int, rate: float, start: int) -> list[int]:
    """Tokens removed per layer at a constant real ``rate`` from ``start`` on (cumulative rounding)."""
    removes, n, done = [], tokens - 1, 0
    for layer in range(depth):
        want = 0
        if layer >= start:
            target = round((layer - start + 1) * rate)
            want = max(0, target - done)
        r = min(want, n // 2, n - 1)
        removes.append(r)
        done += want
        n -= r
    return removes


def solve_schedule(tokens: int, depth: int, dim: int, hidden: int, heads: int, cut: float, start: int, method: str) -> list[int]:
    """The least constant rate whose analytic MACs drop by at least ``cut``; a UserError if no rate can."""
    if start >= depth:
        raise UserError(f"start_layer {start} is past the model's {depth} layers; set tokens.transform start_layer below {depth}")
    dense = schedule_macs(tokens, [0] * depth, dim, hidden, heads)

    def reached(rate: float) -> bool:
        return schedule_macs(tokens, rate_schedule(tokens, depth, rate, start), dim, hidden, heads, method) <= (1 - cut) * dense

    hi = float(tokens)
    if not reached(hi):
        best = schedule_macs(tokens, rate_schedule(tokens, depth, hi, start), dim, hidden, heads, method)
        raise UserError(f"flops_cut {cut} is out of reach for this model (at most {1 - best / dense:.2f} from layer {start}); lower flops_cut or start_layer")
    lo = 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if reached(mid) else (mid, hi)
    return rate_schedule(tokens, depth, hi, start)


def explicit_schedule(tokens: int, depth: int, layers: dict[int, float]) -> list[int]:
    removes, n = [0] * depth, tokens - 1
    for layer in range(depth):
        value = layers.get(layer)
        if value is not None:
            r = int(value) if value >= 1 else n - max(1, round(value * n))
            if value >= 1 and value != int(value):
                raise UserError(f"tokens.transform layers[{layer}] = {value}: give a whole number of tokens to remove or a keep ratio below 1")
            if r > n // 2:
                raise UserError(f"tokens.transform layers[{layer}] removes {r} of {n} patch tokens; at most half ({n // 2}) per layer")
            removes[layer] = r
            n -= r
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise UserError(f"tokens.transform layers names layer {bad[0]}, but the model has layers 0..{depth - 1}")
    return removes


# -- model surgery --------------------------------------------------------------

def _block_list(module):
    """The nn.ModuleList holding the model's transformer blocks."""
    from torch import nn

    from .accounting import token_blocks

    blocks = token_blocks(module)
    for sub in module.modules():
        if isinstance(sub, nn.ModuleList) and len(sub) == len(blocks) and all(a is b for a, b in zip(sub, blocks)):
            return sub
    raise UserError(f"{type(module).__name__}'s transformer blocks are not held in one module list; token compression cannot replace them")


def model_dims(module) -> dict[str, int]:
    """Tokens entering the first block (incl. CLS) and the blocks' width, MLP width, heads and depth."""
    from .blocks import view_of

    blocks = _block_list(module)
    view = view_of(blocks[0].block if hasattr(blocks[0], "remove") else blocks[0])
    pos = getattr(module, "pos_embed", None)
    if pos is None and hasattr(module, "model"):
        pos = module.model.vit.embeddings.position_embeddings
    if pos is None:
        raise UserError(f"cannot tell how many tokens {type(module).__name__} makes; token compression supports edgekit's ViT and Hugging Face ViT")
    return {"tokens": int(pos.shape[1]), "dim": view.dim, "hidden": view.hidden, "heads": view.heads, "depth": len(blocks)}


def apply_token_schedule(module, method: str, remove: list[int], top_m: int = 2, temperature: float = 0.1, anchors: str = "matching"):
    """Replace each block by a TokenBlock removing ``remove[i]`` tokens (the builder transform ``tokens.transform``)."""
    from .blocks import TokenBlock

    blocks = _block_list(module)
    if any(isinstance(b, TokenBlock) for b in blocks):
        raise UserError("this model's tokens are already compressed; apply tokens.transform once")
    if len(remove) != len(blocks):
        raise UserError(f"the token schedule has {len(remove)} layers but the model has {len(blocks)}; re-run tokens.transform on this model")
    for i, r in enumerate(remove):
        blocks[i] = TokenBlock(blocks[i], method, r, top_m, temperature, anchors)
    return module


class TokenTransform(Pass):
    """Cut ViT tokens training-free: Token Transforming, ToMe merging or top-k pruning, at a FLOPs budget or explicit schedule."""

    name = "tokens.transform"
    kind = "compress"
    Config = TokenTransformConfig
    accepts = ("torch",)
    uses_data = ()

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        from .accounting import compare, sample_feed, token_flops

        cfg: TokenTransformConfig = self.config
        dense = artifact.torch_module()
        module = copy.deepcopy(dense).eval()
        d = model_dims(module)
        if cfg.layers is not None:
            removes = explicit_schedule(d["tokens"], d["depth"], cfg.layers)
        else:
            removes = solve_schedule(d["tokens"], d["depth"], d["dim"], d["hidden"], d["heads"], cfg.flops_cut, cfg.start_layer, cfg.cost_key())
        args = {"method": cfg.method, "remove": removes, "top_m": cfg.top_m, "temperature": cfg.temperature, "anchors": cfg.anchors}
        apply_token_schedule(module, **args)

        tokens_in, n = [], d["tokens"]
        for r in removes:
            tokens_in.append(n)
            n -= r
        analytic_dense = schedule_macs(d["tokens"], [0] * d["depth"], d["dim"], d["hidden"], d["heads"])
        analytic = schedule_macs(d["tokens"], removes, d["dim"], d["hidden"], d["heads"], cfg.cost_key())
        info = {
            "method": cfg.method,
            "remove": removes,
            "tokens_in": tokens_in,
            "tokens_out": n,
            "flops_cut_target": cfg.flops_cut,
            "analytic_block_cut": round(1 - analytic / analytic_dense, 4),
        }
        if cfg.method == "transform":
            info.update(top_m=cfg.top_m, temperature=cfg.temperature, anchors=cfg.anchors)
        feed = sample_feed(artifact, ctx)
        info.update(compare(token_flops(dense, feed), token_flops(module, feed)))
        ctx.metrics["tokens"] = info
        ctx.log(f"  tokens.transform ({cfg.method}): tokens per layer {tokens_in} -> {n}, block MACs cut {info['block_macs_cut']:.1%}")
        builder = copy.deepcopy(artifact.builder or {})
        builder["transforms"] = list(builder.get("transforms", [])) + [{"kind": "tokens.transform", "args": args}]
        return artifact.derive(module=module, builder=builder, meta={**artifact.meta, "tokens": info})
