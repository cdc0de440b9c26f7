"""Distillation of decoder-only teachers into encoder-decoder students (``distill.encdec``)
and text-to-text training (``train.seq2seq``); see docs/encdec.md."""
