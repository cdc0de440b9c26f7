"""Compression passes: quantization, pruning, token pruning, distillation, fine-tuning."""
