"""Mixture-of-experts compression: BlockFFN conversion of dense FFNs with the
CLS-aware objectives (``moe.blockffn``), and causal-LM training (``train.lm``).

Names are imported lazily so loading the pass registry does not import torch.
"""

from importlib import import_module

_EXPORTS = {
    "activation_locality": "objectives",
    "chunk_sparsification": "objectives",
    "routing_losses": "objectives",
    "balanced_kmeans": "convert",
    "convert_ffn": "convert",
    "convert_model": "convert",
    "to_blockffn": "convert",
    "evaluate_lm": "lm",
    "finetune": "finetune",
    "BlockFFNConfig": "finetune",
    "train_lm": "train_lm",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
