"""Structured pruning of transformers: VTrans (VIB masks on hidden dimensions,
heads and FFN neurons, trained to a size budget) and importance baselines.

``prune_model`` is the library entry point, ``save_pruned`` / ``load_pruned``
write and read pruned models as transformers folders, and the ``prune.vib``
pass runs it from a recipe. Names are imported lazily so that loading the pass
registry does not import torch.
"""

from importlib import import_module

_EXPORTS = {
    "PruneSettings": "config",
    "prune_model": "search",
    "PruneResult": "search",
    "save_pruned": "hf_io",
    "load_pruned": "hf_io",
    "MaskSet": "masks",
    "VIBMask": "masks",
    "TransformerView": "structure",
    "cut": "structure",
    "restructure": "structure",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
