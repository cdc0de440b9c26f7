"""Token compression for transformers: Token Transforming / ToMe / pruning for ViTs, FastV and FEATHER for VLMs."""
