"""Runtime adapters behind one small interface, and the benchmark harness."""
