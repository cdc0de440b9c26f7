"""Trained weights cached by step key, shared by the training passes.

A pass that trains looks here first: the same model, data and config (the step
key) give the same weights, so a rerun of a recipe loads them instead of training
again. Loading uses ``weights_only=True``; a damaged or stale entry is ignored
(and said so), never fatal.
"""

from __future__ import annotations

from pathlib import Path


def cache_file(ctx, enabled: bool) -> Path | None:
    """Where this step's weights are cached, or None when caching is off or the step has no key."""
    return ctx.cache_dir / "weights" / f"{ctx.key}.pt" if (enabled and ctx.cache_dir and ctx.key) else None


def load_cached(module, path: Path | None, ctx, pass_name: str) -> bool:
    """Load cached weights into ``module``; False when there are none or they do not fit it."""
    import torch

    if path is None or not path.is_file():
        return False
    try:
        module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:  # a damaged or stale cache entry: train again instead of failing
        ctx.log(f"  {pass_name}: ignoring cached weights {path.name} ({type(e).__name__}); training again")
        return False
    return True


def save_cached(module, path: Path | None) -> None:
    """Write ``module``'s weights to the cache (atomically); nothing when caching is off."""
    if path is None:
        return
    import torch

    from edgekit.fsio import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(module.state_dict(), tmp)
