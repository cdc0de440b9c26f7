"""The runtime interface: load an artifact, run feeds, describe the session."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from edgekit.artifact import Artifact


class Session(ABC):
    input_names: list[str]
    output_names: list[str]

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs in the model's order, as numpy arrays."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Runtime name, version, threads and settings, for the report."""


class Runtime(ABC):
    name: ClassVar[str]
    formats: ClassVar[tuple[str, ...]]

    def available(self) -> bool:
        return True

    def skip_reason(self, artifact: Artifact) -> str | None:
        """Why this runtime does not time ``artifact`` although it reads its format (None: it does)."""
        return None

    @abstractmethod
    def version(self) -> str: ...

    @abstractmethod
    def load(self, artifact: Artifact, threads: int | None = None, **options: Any) -> Session: ...
