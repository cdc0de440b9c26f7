"""The CoDeNet-style HLS flow for embedded FPGAs (not built yet)."""
