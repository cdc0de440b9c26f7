"""The distillation loss: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, gold)``.

KL is taken per target token between the teacher's and the student's softmax at
temperature ``T`` (scaled by T^2 so its gradients keep their size as T changes,
as in Hinton et al. 2015), cross-entropy against the gold token at temperature 1;
both are averaged over the target tokens that are not padding. With alpha 0.9 and
T 1 this is the loss of "Return of the Encoder".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    pad: int,
    alpha: float = 0.9,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss over logits (N, T, V) and gold ``target`` (N, T); returns it and its two parts."""
    valid = (target != pad).to(student_logits.dtype)
    n = valid.sum().clamp_min(1.0)
    log_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    kl = (kl * valid).sum() / n * temperature**2
    ce = F.cross_entropy(student_logits.reshape(-1, student_logits.shape[-1]), target.reshape(-1), reduction="none")
    ce = (ce.reshape(target.shape) * valid).sum() / n
    loss = alpha * kl + (1 - alpha) * ce
    return loss, {"kl": float(kl.detach()), "ce": float(ce.detach())}


def target_ce(logits: torch.Tensor, target: torch.Tensor, pad: int) -> torch.Tensor:
    """Cross-entropy on the target tokens only (padding ignored)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=pad)
