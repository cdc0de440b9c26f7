"""Saving and loading pruned Hugging Face models.

A pruned model keeps its family's classes and its original ``config.json``
(so tokenizers, generation settings and the model type still apply) plus one
key, ``edgekit_pruning``: the structure record (kept hidden width, heads and
FFN neurons per layer). Per-layer head and FFN counts are beyond what a
transformers config can express, so :func:`load_pruned` builds the full-size
model from the config, gives it the recorded shape and then loads the weights
(safetensors, no pickle).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from edgekit.errors import UserError

from .structure import TransformerView, restructure

CONFIG_KEY = "edgekit_pruning"


def save_pruned(model: nn.Module, folder: str | Path) -> Path:
    """``save_pretrained`` of a pruned (or unpruned) transformers model, with its structure recorded."""
    view = TransformerView(model)
    hf = view.hf
    folder = Path(folder)
    setattr(hf.config, CONFIG_KEY, view.shape())
    try:
        hf.save_pretrained(str(folder), safe_serialization=True)
    finally:
        delattr(hf.config, CONFIG_KEY)
    return folder


def load_pruned(folder: str | Path) -> nn.Module:
    """Load a model saved by :func:`save_pruned`, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from safetensors.torch import load_file

    folder = Path(folder)
    record = json.loads((folder / "config.json").read_text())
    structure = record.get(CONFIG_KEY)
    if structure is None:
        raise UserError(f"{folder} holds no edgekit pruning record; load it with transformers.AutoModel.from_pretrained")
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if hasattr(config, CONFIG_KEY):  # the record describes weights, not the full-size model built first
        delattr(config, CONFIG_KEY)
    arch = (record.get("architectures") or ["AutoModel"])[0]
    cls = getattr(transformers, arch, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        raise UserError(f"{folder}/config.json names architecture {arch!r}, which this transformers version does not have")
    config._attn_implementation = "eager"
    model = cls(config)
    restructure(model, structure)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} has no .safetensors weights; save the pruned model with edgekit (save_pruned)")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")}  # tied heads are saved once
    if set(missing) - tied or unexpected:
        raise UserError(
            f"the weights in {folder} do not fit its pruning record (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); save the model again with edgekit"
        )
    if tied:
        model.tie_weights()
    return model.eval()
