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

    @abstractmethod
    def version(self) -> str: ...

    @abstractmethod
    def load(self, artifact: Artifact, threads: int | None = None, **options: Any) -> Session: ...
