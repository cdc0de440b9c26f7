"""edgekit: take trained models to edge devices.

The core package holds the CLI, the recipe schema, the pipeline, the artifact
type, the pass registry, datasets, metrics and the report. Algorithms live in
the sibling subpackages (``edgekit.compress``, ``edgekit.export``, ...) and
reach the core only through the pass registry.
"""

__version__ = "0.1.0"
