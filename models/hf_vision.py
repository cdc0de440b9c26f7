"""A Hugging Face ViT image classifier (``ViTForImageClassification``) wrapped to
take ``pixel_values`` and return class logits, loaded offline from a folder.

The forward pass runs the model's own embeddings, layers, final layer norm and
classifier, but loops over the layers itself (:func:`edgekit.models.vit.run_blocks`)
so token-compressed layers can hand token sizes to the next one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from edgekit.artifact import TensorSpec
from edgekit.errors import UserError
from edgekit.models.vit import run_blocks

SUPPORTED_TYPES = ("vit",)


def _model_type(path: str | Path) -> str | None:
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def is_vision_folder(path: str | Path) -> bool:
    """Whether a saved transformers folder holds an image classifier this wrapper supports."""
    return _model_type(path) in SUPPORTED_TYPES


class HFImageClassifier(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        kind = getattr(model.config, "model_type", type(model).__name__)
        if kind not in SUPPORTED_TYPES or not hasattr(model, "vit"):
            raise UserError(f"{type(model).__name__} (model_type {kind}) is not a supported image classifier; edgekit wraps {', '.join(SUPPORTED_TYPES)} models")
        self.model = model
        self.config = model.config

    @classmethod
    def from_folder(cls, path: str | Path) -> HFImageClassifier:
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: the folder holds everything
        kind = _model_type(path)
        if kind not in SUPPORTED_TYPES:
            raise UserError(f"{path} holds a {kind or 'unknown'} model, not an image classifier edgekit supports ({', '.join(SUPPORTED_TYPES)})")
        from transformers import ViTForImageClassification
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model = ViTForImageClassification.from_pretrained(str(path), local_files_only=True, attn_implementation="eager")
        return cls(model).eval()

    def input_specs(self) -> list[TensorSpec]:
        c, s = self.config.num_channels, self.config.image_size
        return [TensorSpec(name="pixel_values", shape=["batch", c, s, s], dtype="float32", layout="NCHW")]

    def token_blocks(self) -> list[nn.Module]:
        return list(self.model.vit.layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vit = self.model.vit
        x = run_blocks(vit.layers, vit.embeddings(pixel_values))
        return self.model.classifier(vit.layernorm(x)[:, 0])
