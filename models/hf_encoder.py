"""A Hugging Face transformers encoder wrapped to take token tensors and return one
pooled vector per sequence (or the last hidden states), so it exports cleanly."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def is_pruned_folder(path: str | Path) -> bool:
    """Whether a saved model folder holds a model edgekit pruned (config key ``edgekit_pruning``)."""
    import json

    config = Path(path) / "config.json"
    try:
        return "edgekit_pruning" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


class HFEncoder(nn.Module):
    def __init__(self, model: nn.Module, pooling: str = "mean", normalize: bool = False):
        super().__init__()
        if pooling not in ("mean", "cls", "none"):
            raise ValueError(f"pooling must be mean, cls or none, not {pooling!r}")
        self.model = model
        self.config = model.config
        self.pooling = pooling
        self.normalize = normalize
        accepted = inspect.signature(model.forward).parameters
        # Only the text inputs the wrapped model really takes become model inputs.
        self.input_names = [n for n in TEXT_INPUTS if n in accepted]
        if getattr(model.config, "type_vocab_size", 1) in (0, None) and "token_type_ids" in self.input_names:
            self.input_names.remove("token_type_ids")

    @classmethod
    def from_folder(cls, path: str | Path, pooling: str = "mean", normalize: bool = False) -> "HFEncoder":
        import os

        # Never reach for a model hub: the folder must hold everything.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if is_pruned_folder(path):  # a pruned model has shapes its config alone cannot describe
            from edgekit.compress.prune.hf_io import load_pruned

            model = load_pruned(path)
        else:
            model = AutoModel.from_pretrained(str(path), local_files_only=True, attn_implementation="eager")
        return cls(model, pooling=pooling, normalize=normalize)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        kwargs = {"input_ids": input_ids}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if token_type_ids is not None and "token_type_ids" in self.input_names:
            kwargs["token_type_ids"] = token_type_ids
        return self.pool(self.model(**kwargs).last_hidden_state, input_ids, attention_mask)

    def pool(self, hidden, input_ids, attention_mask=None):
        """One vector per sequence from the last hidden states (or the states themselves)."""
        if self.pooling == "none":
            return hidden
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        if self.normalize:
            pooled = nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled
