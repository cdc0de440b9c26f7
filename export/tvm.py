"""export.tvm (in progress)."""
