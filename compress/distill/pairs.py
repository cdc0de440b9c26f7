"""Source -> target pairs for text-to-text training, distillation and evaluation.

A split holds ``input_ids`` / ``attention_mask`` (the source, padded at the end)
and ``target_ids`` (the answer ending in EOS, padded with PAD), as ``synth:event_log``
makes them. A decoder-only model reads ``source ++ target``; an encoder-decoder
encodes the source and its decoder reads ``[BOS] ++ target[:-1]``. Both are scored
on the same target positions, so their losses and logits line up token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edgekit.errors import UserError


@dataclass
class Pairs:
    source: torch.Tensor  # (N, S) int64, padding at the end
    source_mask: torch.Tensor  # (N, S) 0/1
    target: torch.Tensor  # (N, T) int64, PAD after EOS

    def __len__(self) -> int:
        return int(self.source.shape[0])

    def rows(self, index) -> "Pairs":
        src, mask, tgt = self.source[index], self.source_mask[index], self.target[index]
        width = max(1, int(mask.sum(-1).max()))  # drop padding columns no row in this batch uses
        return Pairs(src[:, :width], mask[:, :width], tgt)


def pairs_of(ctx, split: str, pass_name: str) -> Pairs:
    """The ``split`` of the recipe data as :class:`Pairs`, checked."""
    if ctx.data is None:
        raise UserError(f"{pass_name} trains on source -> target pairs; add data: {{source: synth:event_log:4000}} or an npz with input_ids, attention_mask and target_ids")
    arrays = ctx.data.split(split).arrays
    missing = [k for k in ("input_ids", "target_ids") if k not in arrays]
    if missing:
        raise UserError(
            f"{pass_name} needs input_ids and target_ids in the {split} data, which lacks {', '.join(missing)}; "
            "use synth:event_log:N or an npz with those arrays"
        )
    src = np.asarray(arrays["input_ids"], dtype=np.int64)
    mask = np.asarray(arrays.get("attention_mask", np.ones_like(src)), dtype=np.int64)
    tgt = np.asarray(arrays["target_ids"], dtype=np.int64)
    if src.ndim != 2 or tgt.ndim != 2 or mask.shape != src.shape or len(tgt) != len(src):
        raise UserError(f"{pass_name}: input_ids {list(src.shape)}, attention_mask {list(mask.shape)} and target_ids {list(tgt.shape)} must be (samples, length) with one row per sample")
    return Pairs(torch.from_numpy(src), torch.from_numpy(mask), torch.from_numpy(tgt))


def check_vocab(pairs: Pairs, vocab: int, pass_name: str) -> None:
    top = int(max(pairs.source.max(), pairs.target.max()))
    if top >= vocab:
        raise UserError(f"{pass_name}: the data has token ids up to {top} but the model's vocabulary has {vocab}; tokenize the data for this model")


def decoder_only_batch(pairs: Pairs, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``source ++ target`` per row, right-padded, and the index (N, T) of the logit that predicts each target token."""
    lengths = pairs.source_mask.sum(-1)
    t = pairs.target.shape[1]
    width = int(lengths.max()) + t
    seq = torch.full((len(pairs), width), pad, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        seq[i, :n] = pairs.source[i, :n]
        seq[i, n : n + t] = pairs.target[i]
    where = (lengths - 1).unsqueeze(1) + torch.arange(t).unsqueeze(0)
    return seq, where


def decoder_inputs(target: torch.Tensor, bos: int) -> torch.Tensor:
    """``[BOS] ++ target[:-1]``: what the decoder of an encoder-decoder reads to predict ``target``."""
    return torch.cat([torch.full_like(target[:, :1], bos), target[:, :-1]], dim=1)


def target_logits(model, pairs: Pairs) -> torch.Tensor:
    """Logits (N, T, vocab) predicting each target token, from either kind of model (teacher forcing)."""
    cfg = model.cfg
    if getattr(model, "kind", None) == "encdec":
        return model(pairs.source, pairs.source_mask, decoder_inputs(pairs.target, cfg.bos))
    seq, where = decoder_only_batch(pairs, cfg.pad)
    logits = model(seq)
    return logits.gather(1, where.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


@torch.no_grad()
def exact_match(model, pairs: Pairs) -> dict:
    """Greedy answers against the targets, in percent: exact match (whole answer) and token accuracy."""
    from edgekit.evaluate import score_generation, torch_generator

    was_training = model.training
    model.eval()
    try:
        got = score_generation(*torch_generator(model), pairs.source.numpy(), pairs.source_mask.numpy(), pairs.target.numpy())
    finally:
        model.train(was_training)
    return {"exact_match": round(100.0 * got["rows"], 2), "token_accuracy": round(100.0 * got["tokens"], 2), "samples": len(pairs)}


@torch.no_grad()
def teacher_targets(model, pairs: Pairs, batch_size: int = 64) -> torch.Tensor:
    """The model's own greedy answers to every source, shaped like ``pairs.target`` (PAD after EOS):
    the targets of sequence-level distillation. Rows of one source length generate together,
    since a decoder-only prompt cannot be padded."""
    from edgekit.models.encdec import generate

    width, pad = pairs.target.shape[1], model.cfg.pad
    out = torch.full_like(pairs.target, pad)
    lengths = pairs.source_mask.sum(-1)
    for n in lengths.unique().tolist():
        rows = torch.nonzero(lengths == n).flatten()
        for start in range(0, len(rows), batch_size):
            idx = rows[start : start + batch_size]
            new = generate(model, pairs.source[idx, :n], width)
            out[idx, : new.shape[1]] = new
    return out
