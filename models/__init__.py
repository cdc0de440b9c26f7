"""A zoo of edge architectures, each exportable (``zoo:NAME`` in recipes)."""

from edgekit.models.registry import ModelInfo, create_model, list_models, model_info, register_model

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "register_model"]
