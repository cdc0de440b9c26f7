"""Lossless speculative decoding at batch 1: a draft proposes tokens, the model verifies them in one pass.

- ``target.py``: the model being accelerated, with a key/value cache that can grow by a
  draft (a chain or a tree) and roll back to the accepted path (:class:`TorchTarget`;
  ``ort_target.py`` holds the ONNX Runtime one).
- ``verify.py``: the one verification loop, greedy (output identical to plain greedy) or
  sampled (the speculative acceptance rule keeps the model's distribution).
- ``drafters/``: where drafts come from: prompt/n-gram lookup, ADED's adaptive tri-gram
  trees, SWIFT's layer-skipping self-draft, a trained Chimera-style head.

Out of scope: diffusion-LLM decoding (Learn2PD, Fast-dLLM v2) and vision-language drafting (ViSpec).
"""

from edgekit.runtimes.decoding.verify import Generation, generate

__all__ = ["Generation", "generate"]
