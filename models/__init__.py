"""A zoo of edge architectures, each exportable."""
