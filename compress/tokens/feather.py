"""``tokens.feather``: training-free visual token pruning for a VLM's language model (FastV and FEATHER).

Both methods drop image tokens inside the LM, keep every text token, and leave
each kept token its original position id:

- ``fastv`` (Chen et al. 2024): before one early block, rank the image tokens by
  the softmax attention (over the image keys only, mean over heads) of the last
  token's query, computed with RoPE, and keep the top share. RoPE's long-range
  decay favours keys near the query — the last image rows — so this keeps the
  bottom of the image and loses the top.
- ``fastv_norope``: the same score without the rotary embedding.
- ``feather`` (Endo et al. 2024, github markendo/FEATHER): stage 1 keeps the
  top share by the no-RoPE score together with a uniform grid (every
  ``grid_stride``-th row and column of the image-token grid), so every region
  keeps a foothold; stage 2, deeper, keeps the top share of the survivors.

As in the official code, a stage "before block L" scores with block L-1 (the
last block that still sees every image token) and removes the dropped tokens
from block L-1's output. Token counts are fixed when the schedule is planned,
so the pruned model is TopK + gather and exports to ONNX with static shapes.

One deliberate difference: the paper's stage 1 keeps the *union* of the top
30% and the grid, whose size depends on the overlap. Here the grid is always
kept and the top ``keep1`` share is taken among the other tokens, so the count
is fixed (it equals the union's upper bound) and equal compute is exact.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Literal

from pydantic import Field

from edgekit.artifact import Artifact
from edgekit.errors import UserError
from edgekit.passes import Pass, PassConfig, PassContext

METHODS = ("fastv", "fastv_norope", "feather")


class FeatherConfig(PassConfig):
    method: Literal["fastv", "fastv_norope", "feather"] = Field(
        "feather", description="fastv: one stage, RoPE score; fastv_norope: one stage, score without RoPE; feather: two stages, no-RoPE score + uniform grid"
    )
    stage1: float = Field(
        0.25, gt=0, lt=1, description="first stage as a fraction of the LM depth: tokens are cut before block round(stage1 * depth) (paper: layer 8 of 32)"
    )
    stage2: float = Field(0.5, gt=0, lt=1, description="FEATHER's second stage as a fraction of the LM depth (paper: layer 16 of 32)")
    keep1: float = Field(0.3, gt=0, le=1, description="FEATHER stage 1: share of the image tokens kept by score, besides the grid (paper 0.3)")
    grid_stride: int = Field(3, ge=0, description="FEATHER stage 1 always keeps every grid_stride-th row and column of the image-token grid (paper 3); 0: no grid")
    keep2: float = Field(
        0.25,
        gt=0,
        le=1,
        description="FEATHER stage 2: share of the stage-1 survivors kept (paper 0.09 of ~200 of 576 tokens; at 64 image tokens that would leave 2, so the default keeps 7 of 28)",
    )
    fastv_keep: float | None = Field(
        None,
        gt=0,
        le=1,
        description="fastv / fastv_norope: share of the image tokens kept; null: chosen so the LM blocks read as many image tokens as FEATHER's schedule (equal compute)",
    )


@functools.cache
def _select_class():
    """The stage module class, defined on first use so importing this pass does not import torch."""
    from torch import nn

    class ImageTokenSelect(nn.Module):
        """A stage: ``forward(block, hidden, pos, n_img) -> (batch, keep)`` sorted indices of the image tokens to keep."""

        def __init__(self, keep: int, rope: bool, grid_stride: int, cols: int):
            super().__init__()
            self.keep, self.rope, self.grid_stride, self.cols = keep, rope, grid_stride, cols

        def forward(self, block, h, pos, n_img: int):
            scores = block.image_scores(h, pos, n_img, self.rope)  # softmax weights, all <= 1
            if self.grid_stride:
                p = pos[:, :n_img]  # image tokens come first, so their position id is their grid index
                s = self.grid_stride
                on_grid = ((p // self.cols) % s == 0) & ((p % self.cols) % s == 0)
                scores = scores + on_grid.to(scores.dtype) * 2.0  # grid tokens outrank every other token
            return scores.topk(self.keep, dim=1).indices.sort(dim=1).values

        def extra_repr(self) -> str:
            return f"keep={self.keep}, rope={self.rope}, grid_stride={self.grid_stride}"

    return ImageTokenSelect


def _check_model(module) -> tuple[int, int, int, int]:
    """(depth, image tokens, rows, cols) of a model this pass can prune, or a UserError naming its architecture."""
    from edgekit.compress.tokens.accounting import token_blocks

    blocks = token_blocks(module)
    stages, grid = getattr(module, "token_stages", None), getattr(module, "image_grid", None)
    if stages is None or grid is None or not all(hasattr(b, "image_scores") for b in blocks):
        raise UserError(
            f"tokens.feather prunes the image tokens of a vision-language model whose LM blocks can score them (edgekit's tiny_vlm); "
            f"{type(module).__name__} does not expose token_stages, image_grid and image_scores"
        )
    if len(stages):
        raise UserError(f"this {type(module).__name__} already prunes image tokens; apply tokens.feather once, to the unpruned model")
    rows, cols = grid
    return len(blocks), rows * cols, rows, cols


def _layer(share: float, depth: int, field: str) -> int:
    layer = round(share * depth)
    if not 1 <= layer < depth:
        raise UserError(f"{field}: {share} puts a stage before block {layer} of {depth}; pick a share between {1 / depth:.3g} and {(depth - 1) / depth:.3g}")
    return layer


def _grid_count(rows: int, cols: int, stride: int) -> int:
    return 0 if stride == 0 else len(range(0, rows, stride)) * len(range(0, cols, stride))


def plan_stages(module, cfg: FeatherConfig) -> list[dict[str, Any]]:
    """The fixed schedule for ``module``: ``[{"layer", "keep", "rope", "grid_stride"}]`` per stage."""
    depth, n, rows, cols = _check_model(module)
    l1 = _layer(cfg.stage1, depth, "stage1")
    l2 = _layer(cfg.stage2, depth, "stage2")
    grid = _grid_count(rows, cols, cfg.grid_stride)
    k1 = min(n, grid + max(1, round(cfg.keep1 * n)))
    k2 = max(1, round(cfg.keep2 * k1))
    feather = [
        {"layer": l1, "keep": k1, "rope": False, "grid_stride": cfg.grid_stride},
        {"layer": l2, "keep": k2, "rope": False, "grid_stride": 0},
    ]
    if cfg.method == "feather":
        if l2 <= l1:
            raise UserError(f"stage2 ({cfg.stage2} -> block {l2}) must come after stage1 ({cfg.stage1} -> block {l1}); raise stage2")
        return feather
    if cfg.fastv_keep is not None:
        keep = max(1, round(cfg.fastv_keep * n))
    else:  # equal compute: the blocks from l1 on read as many image tokens in total as under FEATHER
        total = (l2 - l1) * k1 + (depth - l2) * k2 if l2 > l1 else (depth - l1) * k1
        keep = max(1, round(total / (depth - l1)))
    return [{"layer": l1, "keep": min(keep, n), "rope": cfg.method == "fastv", "grid_stride": 0}]


def apply_feather(module, stages: list[dict[str, Any]] | None = None, **config: Any):
    """Install pruning stages into ``module`` (in place) and return it.

    ``stages`` is a planned schedule (what the builder records, so a reloaded
    artifact gets exactly the same counts); without it the schedule is planned
    from :class:`FeatherConfig` fields given as keywords, e.g. ``method="fastv"``.
    """
    _, n, _, cols = _check_model(module)
    if stages is None:
        stages = plan_stages(module, FeatherConfig(**config))
    elif config:
        raise UserError(f"apply_feather takes either a planned schedule or config fields, not both ({', '.join(config)})")
    for stage in stages:
        if not 1 <= stage["keep"] <= n:
            raise UserError(f"a stage keeps {stage['keep']} image tokens but the model has {n}; re-plan the schedule")
        module.token_stages[str(stage["layer"])] = _select_class()(int(stage["keep"]), bool(stage["rope"]), int(stage["grid_stride"]), cols)
    return module


def kept_positions(module, feeds: dict[str, Any]) -> dict[int, Any]:
    """Per stage layer: the original grid indices of the image tokens kept, ``(batch, keep)`` int64 tensors."""
    import torch

    from edgekit.runtimes.torch_eager import call_module

    found: dict[int, torch.Tensor] = {}

    def record(layer: int):
        def hook(_mod, args, out):
            found[layer] = args[2].gather(1, out)  # args: (block, hidden, pos, n_img)

        return hook

    handles = [stage.register_forward_hook(record(int(key))) for key, stage in module.token_stages.items()]
    try:
        with torch.no_grad():
            call_module(module, {k: torch.as_tensor(v) for k, v in feeds.items()}, list(feeds))
    finally:
        for h in handles:
            h.remove()
    return dict(sorted(found.items()))


class TokensFeather(Pass):
    """Prune a VLM's image tokens inside its LM: FastV (RoPE score) or FEATHER (no-RoPE score + uniform grid, two stages)."""

    name = "tokens.feather"
    kind = "compress"
    Config = FeatherConfig
    accepts = ("torch",)

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        from edgekit.compress.tokens.accounting import compare, sample_feed, token_flops

        cfg: FeatherConfig = self.config
        dense = artifact.torch_module().eval()
        module = copy.deepcopy(dense)
        stages = plan_stages(module, cfg)
        apply_feather(module, stages=stages)
        feed = sample_feed(artifact, ctx)
        result = compare(token_flops(dense, feed), token_flops(module, feed))
        result.update(method=cfg.method, stages=stages, image_tokens=module.image_grid[0] * module.image_grid[1])
        ctx.metrics["tokens"] = result
        schedule = ", ".join(f"block {s['layer']}: {s['keep']}" for s in stages)
        ctx.log(f"  tokens.feather ({cfg.method}): image tokens kept {schedule}; LM block MACs -{result['block_macs_cut']:.0%}")
        builder = copy.deepcopy(artifact.builder or {})
        builder.setdefault("transforms", []).append({"kind": "tokens.feather", "args": {"stages": stages}})
        return artifact.derive(module=module, builder=builder, meta={**artifact.meta, "tokens": result})
