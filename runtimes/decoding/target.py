"""The model a speculative decoder drives: a forward pass over new tokens and a cache that rolls back.

Batch 1. A draft is fed after the committed cache as one block; afterwards :meth:`Target.keep`
keeps the tokens of the accepted path (for a chain, a prefix; for a tree, a branch) and drops
the others, so the cache again holds exactly what a plain run over the accepted text would.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np

from edgekit.errors import UserError


class Target:
    """What the verification loop needs from a model; see :class:`TorchTarget` for the contract."""

    vocab: int
    length: int = 0

    def reset(self) -> None:
        raise NotImplementedError

    def forward(self, tokens: Sequence[int], positions: np.ndarray | None = None, tree_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def keep(self, start: int, indices: Sequence[int]) -> None:
        raise NotImplementedError

    def cache_arrays(self) -> list[tuple[np.ndarray, np.ndarray]]:
        raise NotImplementedError


def check_feed(tokens: Sequence[int], positions, tree_mask, vocab: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Token ids, positions and tree mask as arrays, checked against each other and the vocabulary."""
    ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
    t = len(ids)
    if t == 0:
        raise UserError("a decoding step needs at least one token")
    if ids.min() < 0 or ids.max() >= vocab:
        raise UserError(f"token ids must lie in [0, {vocab}), got {int(ids.min())}..{int(ids.max())}; use the model's tokenizer")
    pos = np.arange(length, length + t, dtype=np.int64) if positions is None else np.asarray(positions, dtype=np.int64).reshape(-1)
    if len(pos) != t:
        raise UserError(f"{t} tokens but {len(pos)} positions; give one position per token")
    mask = None
    if tree_mask is not None:
        mask = np.asarray(tree_mask, dtype=bool)
        if mask.shape != (t, t):
            raise UserError(f"the tree mask must be ({t}, {t}) for {t} tokens, got {list(mask.shape)}")
    return ids, pos, mask


@contextmanager
def final_hidden(model) -> Iterator[list]:
    """Collect the outputs of ``model.norm`` (the final hidden states the LM head reads) while inside."""
    seen: list = []
    handle = model.norm.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        yield seen
    finally:
        handle.remove()


class TorchTarget(Target):
    """edgekit's ``DecoderLM`` (incl. Hugging Face Llama / Qwen2 / Mistral checkpoints converted into it)
    or ``TinyLM`` (incl. BlockFFN models on the sparse kernels) in torch, at batch 1.

    ``forward`` returns each new token's logits and final hidden state (the LM head's input,
    which a trained draft head reads); ``draft_forward`` runs a layer-skipping pass on a
    private extension of the cache (SWIFT's self-draft) without touching the committed one.
    """

    def __init__(self, model):
        import torch

        from edgekit.models.encdec import DecoderLM
        from edgekit.models.tiny_lm import TinyLM

        if not isinstance(model, (DecoderLM, TinyLM)):
            raise UserError(
                f"speculative decoding runs edgekit's causal language models, DecoderLM or TinyLM, not {type(model).__name__}; "
                "load a Llama / Qwen2 / Mistral checkpoint with hf:DIR (it converts into DecoderLM) or pick a zoo LM"
            )
        self.torch = torch
        self.model = model.eval()
        self.layers = len(model.layers) if isinstance(model, DecoderLM) else len(model.blocks)
        self.vocab = int(model.cfg.vocab if isinstance(model, DecoderLM) else model.vocab)
        self.max_len = getattr(model, "max_seq", None)
        self.cache: list | None = None
        self.length = 0

    def reset(self) -> None:
        self.cache, self.length = None, 0

    def _step(self, ids, pos, mask, past, skip=frozenset()):
        torch = self.torch
        with torch.inference_mode(), final_hidden(self.model) as hidden:
            logits, cache = self.model.step(
                torch.from_numpy(ids).unsqueeze(0), past, positions=torch.from_numpy(pos),
                tree_mask=None if mask is None else torch.from_numpy(mask), skip=skip,
            )
        return logits[0], hidden[-1][0], cache

    def forward(self, tokens, positions=None, tree_mask=None):
        ids, pos, mask = check_feed(tokens, positions, tree_mask, self.vocab, self.length)
        logits, hidden, self.cache = self._step(ids, pos, mask, self.cache)
        self.length += len(ids)
        return logits.float().numpy(), hidden.float().numpy()

    def draft_forward(self, tokens, positions, skip: frozenset[int], past: list | None):
        """Logits of a pass with the layers in ``skip`` run as identity, after ``past`` (default: the
        committed cache); returns (logits, the extended private cache). The committed cache is unchanged."""
        ids, pos, _ = check_feed(tokens, positions, None, self.vocab, self.length)
        logits, _, cache = self._step(ids, pos, None, self.cache if past is None else past, skip)
        return logits.float().numpy(), cache

    def truncated_cache(self, n: int) -> list:
        """The committed cache's first ``n`` tokens (views; for a self-draft's scoring pass)."""
        return [(k[:, :, :n], v[:, :, :n]) for k, v in self.cache]

    def keep(self, start, indices):
        idx = list(indices)
        if self.cache is None and start == 0 and not idx:
            return
        if start > self.length or any(i < 0 or start + i >= self.length for i in idx):
            raise UserError(f"cannot keep tokens {idx} after {start} of a cache holding {self.length}")
        torch = self.torch
        if idx == list(range(len(idx))):  # a prefix of the new block: a slice, no copy
            n = start + len(idx)
            self.cache = [(k[:, :, :n], v[:, :, :n]) for k, v in self.cache]
        else:
            sel = torch.tensor(list(range(start)) + [start + i for i in idx], dtype=torch.long)
            self.cache = [(k.index_select(2, sel), v.index_select(2, sel)) for k, v in self.cache]
        self.length = start + len(idx)

    def cache_arrays(self):
        return [] if self.cache is None else [(k[0].numpy().copy(), v[0].numpy().copy()) for k, v in self.cache]

    def embedding(self) -> np.ndarray:
        """The token embedding matrix (vocab, dim) (tied to the LM head in edgekit's zoo LMs)."""
        m = self.model
        return (m.embed_tokens if hasattr(m, "embed_tokens") else m.embed).weight.detach().float().numpy()

    def head(self) -> np.ndarray:
        """The LM head's weight (vocab, dim): logits = hidden @ head().T."""
        lm_head = getattr(self.model, "lm_head", None)
        return lm_head.weight.detach().float().numpy() if lm_head is not None else self.embedding()
