"""Token counts and MACs layer by layer, measured on one forward pass.

A token-compressible model exposes ``token_blocks()``: its transformer blocks in
execution order, each called with hidden states ``(batch, tokens, dim)`` first.
Forward hooks read how many tokens enter and leave each block (a block may
merge or drop tokens between its attention and its MLP), and PyTorch's FLOP
counter, read before and after each block, gives the block's MACs (FLOPs / 2)
— so what is reported is what the compressed model computes, including the
cost of building and applying the token matrices inside the blocks.
"""

from __future__ import annotations

from typing import Any

from edgekit.errors import UserError


def token_blocks(module) -> list:
    """The model's transformer blocks, or a UserError naming the architecture."""
    fn = getattr(module, "token_blocks", None)
    if not callable(fn):
        raise UserError(
            f"{type(module).__name__} does not expose its transformer blocks (token_blocks()); "
            "token compression supports edgekit's ViT and VLM and Hugging Face ViT models"
        )
    return list(fn())


def token_flops(module, feeds: dict[str, Any]) -> dict[str, Any]:
    """Per block: tokens entering it and its MACs, for one forward pass on ``feeds`` (batch 1).

    Returns ``{"layers": [{"layer", "tokens", "tokens_out", "macs"}], "block_macs", "total_macs"}``.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from edgekit.runtimes.torch_eager import call_module

    blocks = token_blocks(module)
    counter = FlopCounterMode(display=False)
    rows: list[dict[str, int]] = [{"layer": i, "tokens": 0, "tokens_out": 0, "macs": 0} for i in range(len(blocks))]
    start: dict[int, int] = {}

    def before(i):
        def hook(_mod, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            rows[i]["tokens"] = int(x.shape[1])
            start[i] = counter.get_total_flops()

        return hook

    def after(i):
        def hook(_mod, _args, out):
            rows[i]["macs"] += int((counter.get_total_flops() - start.pop(i)) // 2)
            hidden = out[0] if isinstance(out, (tuple, list)) else out
            rows[i]["tokens_out"] = int(hidden.shape[1]) if hasattr(hidden, "shape") and hidden.ndim == 3 else rows[i]["tokens"]

        return hook

    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(before(i), with_kwargs=True))
        handles.append(block.register_forward_hook(after(i)))
    was_training = module.training
    module.eval()
    tensors = {k: torch.as_tensor(v) for k, v in feeds.items()}
    try:
        with torch.no_grad(), counter:
            call_module(module, tensors, list(tensors))
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    return {
        "layers": rows,
        "block_macs": sum(r["macs"] for r in rows),
        "total_macs": int(counter.get_total_flops() // 2),
    }


def sample_feed(artifact, ctx) -> dict[str, Any]:
    """One batch-1 sample to count on: the recipe's first data sample, else random values shaped to the inputs."""
    samples = ctx.samples(1) if ctx.samples is not None else []
    if samples:
        return {k: v[:1] for k, v in samples[0].items()}
    dims = {**artifact.meta.get("dims", {}), **ctx.dims, "batch": 1}
    return {s.name: s.random(dims, seed=ctx.seed) for s in artifact.inputs}


def compare(dense: dict[str, Any], compressed: dict[str, Any]) -> dict[str, Any]:
    """``compressed`` with the dense model's per-layer numbers beside it and the share of MACs cut."""
    out = dict(compressed)
    layers = []
    for d, c in zip(dense["layers"], compressed["layers"]):
        layers.append({**c, "dense_tokens": d["tokens"], "dense_macs": d["macs"]})
    out["layers"] = layers
    out["dense_block_macs"] = dense["block_macs"]
    out["dense_total_macs"] = dense["total_macs"]
    out["block_macs_cut"] = round(1 - compressed["block_macs"] / dense["block_macs"], 4) if dense["block_macs"] else 0.0
    out["total_macs_cut"] = round(1 - compressed["total_macs"] / dense["total_macs"], 4) if dense["total_macs"] else 0.0
    return out


def format_layers(tokens: dict[str, Any]) -> list[str]:
    """Markdown table lines: layer, tokens in and out, MACs (dense -> compressed)."""
    lines = ["| layer | tokens in | tokens out | MACs |", "| ---: | ---: | ---: | ---: |"]
    for row in layer_rows(tokens):
        lines.append("| " + " | ".join(row) + " |")
    return lines


def layer_rows(tokens: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Per block: layer, tokens in, tokens out, MACs ("dense → compressed" where they differ)."""
    from edgekit.report import human_count

    out = []
    for row in tokens.get("layers", []):
        dt, dm = row.get("dense_tokens"), row.get("dense_macs")
        tok = f"{dt} → {row['tokens']}" if dt is not None and dt != row["tokens"] else f"{row['tokens']}"
        macs = human_count(row["macs"])
        if dm is not None and dm != row["macs"]:
            macs = f"{human_count(dm)} → {macs}"
        out.append((str(row["layer"]), tok, str(row.get("tokens_out", row["tokens"])), macs))
    return out
