"""Drafters by name: ``make_drafter("aded", target, size=16)``."""

from __future__ import annotations

import inspect
from typing import Any

from edgekit.errors import UserError
from edgekit.runtimes.decoding.verify import Drafter

NAMES = {
    "ngram": "prompt / n-gram lookup in the context (training-free)",
    "aded": "ADED: adaptive tri-gram table searched into a draft tree (training-free)",
    "swift": "SWIFT: the model with layers skipped drafts for itself (training-free; torch models)",
    "head": "trained Chimera-style draft head over the model's hidden state (weights=PATH.npz)",
}


def drafter_class(name: str) -> type[Drafter]:
    if name == "ngram":
        from edgekit.runtimes.decoding.drafters.ngram import NgramDrafter as cls
    elif name == "aded":
        from edgekit.runtimes.decoding.drafters.aded import AdedDrafter as cls
    elif name == "swift":
        from edgekit.runtimes.decoding.drafters.swift import SwiftDrafter as cls
    elif name == "head":
        from edgekit.runtimes.decoding.drafters.head import HeadDrafter as cls
    else:
        raise UserError(f"unknown drafter {name!r}; pick one of {', '.join(NAMES)}")
    return cls


def make_drafter(name: str, target: Any, **options: Any) -> Drafter:
    """A drafter for ``target``; ``options`` are the drafter's settings (an unknown one is an error)."""
    cls = drafter_class(name)
    params = inspect.signature(cls.__init__).parameters
    unknown = [k for k in options if k not in params or k in ("self", "target")]
    if unknown:
        allowed = [k for k in params if k not in ("self", "target")]
        raise UserError(f"drafter {name} has no setting {', '.join(unknown)}; its settings are {', '.join(allowed) or 'none'}")
    return cls(target, **options) if "target" in params else cls(**options)
