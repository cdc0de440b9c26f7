"""The training signal while pruning: distillation from the unpruned model
(outputs and hidden states), plus the task loss where the data has labels
(class labels, or the text itself for a causal language model)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

HF_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class Outputs:
    out: torch.Tensor  # pooled embedding [B, D], class scores [B, C] or token logits / states [B, T, D]
    hidden: tuple[torch.Tensor, ...]  # per-layer hidden states (embeddings first)
    logits: bool  # whether ``out`` are scores over classes / vocabulary


def forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> Outputs:
    """Run an edgekit encoder wrapper or a transformers model, returning outputs and hidden states."""
    inner = getattr(model, "model", None)
    if hasattr(model, "pool") and isinstance(inner, nn.Module):  # edgekit's HFEncoder
        kwargs = {k: batch[k] for k in model.input_names if k in batch}
        res = inner(**kwargs, output_hidden_states=True)
        pooled = model.pool(res.last_hidden_state, batch["input_ids"], batch.get("attention_mask"))
        return Outputs(pooled, tuple(res.hidden_states), logits=False)
    kwargs = {k: v for k, v in batch.items() if k in HF_KEYS}
    res = model(**kwargs, output_hidden_states=True)
    if getattr(res, "logits", None) is not None:
        return Outputs(res.logits, tuple(res.hidden_states), logits=True)
    return Outputs(res.last_hidden_state, tuple(res.hidden_states), logits=False)


def take_batch(data: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Samples ``idx`` of ``data`` with their token axes cut to the longest of them (right padding)."""
    batch = {k: v[idx] for k, v in data.items()}
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return batch
    length = int(mask.sum(1).max().clamp(min=1))
    return {k: (v[:, :length] if v.dim() == 2 and k != "labels" else v) for k, v in batch.items()}


def distill_loss(student: Outputs, teacher: Outputs, attention_mask: torch.Tensor | None, use_hidden: bool, hidden_weight: float) -> torch.Tensor:
    """Match the teacher's outputs (KL on logits, cosine + scaled MSE on vectors) and,
    optionally, its hidden states layer by layer."""
    s, t = student.out, teacher.out
    if student.logits:
        tokens = s.dim() == 3
        loss = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
        loss = _masked_mean(loss, attention_mask if tokens else None)
    else:
        cos = 1 - F.cosine_similarity(s, t, dim=-1)
        mse = (s - t).pow(2).mean(-1) / t.pow(2).mean().clamp(min=1e-8)
        per = cos + mse
        loss = _masked_mean(per, attention_mask if per.dim() == 2 else None)
    if use_hidden and hidden_weight > 0 and len(student.hidden) == len(teacher.hidden):
        terms = []
        for hs, ht in zip(student.hidden[1:], teacher.hidden[1:]):
            err = (hs - ht).pow(2).mean(-1) / ht.pow(2).mean().clamp(min=1e-8)
            terms.append(_masked_mean(err, attention_mask))
        loss = loss + hidden_weight * torch.stack(terms).mean()
    return loss


def task_loss(model: nn.Module, student: Outputs, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Cross-entropy on class labels, or next-token loss for a causal LM; None without labels."""
    labels = batch.get("labels")
    if labels is not None and student.logits and student.out.dim() == 2:
        return F.cross_entropy(student.out, labels.long())
    if student.logits and student.out.dim() == 3 and _is_causal(model):
        logits = student.out[:, :-1]
        target = batch["input_ids"][:, 1:].clone()
        mask = batch.get("attention_mask")
        if mask is not None:
            target[mask[:, 1:] == 0] = -100
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
    return None


def _is_causal(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return bool(getattr(cfg, "is_decoder", False) or getattr(cfg, "model_type", "") in ("gpt2", "gpt_neo", "gptj", "opt", "llama"))


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None or values.dim() != 2 or mask.shape != values.shape:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp(min=1.0)
