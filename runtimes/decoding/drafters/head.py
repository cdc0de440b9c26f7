"""A trained light draft head over the model's own hidden state (Chimera-style).

After "Chimera: A Lossless Decoding Method for Accelerating Large Language Models Inference
by Fusing All Tokens" (Zeng et al., 2024) and Medusa: the model's final hidden state at the
last verified position already encodes the context, so a small network on top of it, fed the
last two tokens (the trigram view Chimera's lightweight encoder takes), can guess the next few
tokens. Draft step j computes

    g_j = h + W2 silu(W1 [h; E[y_{j-1}]; E[y_{j-2}]] + b1 + d_j),   logits_j = g_j H^T

with h the model's final (normed) hidden state, E its token embedding, H its LM head (both
frozen, read from the model) and d_j a learned per-depth bias; y_0 is the pending token. It is
trained on text with the model frozen to predict the model's own greedy choice at each depth
(self-distillation: the drafts that get accepted are the model's, not the text's), teacher-forced
on the text. Chimera's full-context decoder layer is left out: the hidden state carries the context.

Inference is numpy only (it drafts for ONNX Runtime targets as well); the weights are an .npz
read with ``allow_pickle=False``.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgekit.errors import UserError
from edgekit.runtimes.decoding.verify import Draft, Drafter, draw, softmax

FORMAT = 1


@dataclass
class HeadWeights:
    w1: np.ndarray  # (3 * dim, hidden)
    b1: np.ndarray  # (hidden,)
    w2: np.ndarray  # (hidden, dim)
    depth_bias: np.ndarray  # (depth, hidden)
    vocab: int

    @property
    def dim(self) -> int:
        return int(self.w2.shape[1])

    @property
    def depth(self) -> int:
        return int(self.depth_bias.shape[0])

    def save(self, path: str | Path) -> None:
        """Write the .npz atomically (a temp file renamed into place)."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent or ".")
        os.close(fd)
        try:
            np.savez(tmp, format=np.int64(FORMAT), vocab=np.int64(self.vocab), w1=self.w1, b1=self.b1, w2=self.w2, depth_bias=self.depth_bias)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str | Path) -> "HeadWeights":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"draft head weights {path} do not exist; train them with `edgekit train-drafter`")
        unreadable = (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile)
        try:
            z = np.load(path, allow_pickle=False)
        except unreadable as e:
            raise UserError(f"{path} is not a draft head file ({type(e).__name__}); train one with `edgekit train-drafter`") from None
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise UserError(f"{path} holds a single array, not a draft head .npz; train one with `edgekit train-drafter`")
        with z:
            try:
                if int(z["format"]) != FORMAT:
                    raise UserError(f"{path} is a draft head of format {int(z['format'])}, this edgekit reads {FORMAT}; retrain it")
                return cls(z["w1"], z["b1"], z["w2"], z["depth_bias"], int(z["vocab"]))
            except unreadable as e:
                raise UserError(f"{path} is not a draft head file ({type(e).__name__}: {e}); train one with `edgekit train-drafter`") from None


class HeadDrafter(Drafter):
    name = "head"

    def __init__(self, target, weights: str | Path | HeadWeights | None = None, confidence: float = 0.2, budget: bool = True):
        if weights is None:
            raise UserError("the head drafter needs trained weights: pass weights=PATH.npz (see `edgekit train-drafter`)")
        self.w = weights if isinstance(weights, HeadWeights) else HeadWeights.load(weights)
        if not (hasattr(target, "embedding") and hasattr(target, "head")):
            raise UserError(f"the head drafter reads the model's embedding and LM head, which {type(target).__name__} does not expose")
        self.embed, self.lm_head = target.embedding(), target.head()
        if self.embed.shape != (self.w.vocab, self.w.dim) or self.lm_head.shape != self.embed.shape:
            raise UserError(
                f"the draft head was trained for vocabulary {self.w.vocab} and width {self.w.dim}, the model has "
                f"{self.embed.shape[0]} and {self.embed.shape[1]}; train a head for this model"
            )
        self.confidence, self.budget = confidence, budget

    def propose(self, context: list[int], hidden: np.ndarray, max_depth: int) -> Draft:
        h = np.asarray(hidden, dtype=np.float32)
        prev2, prev1 = (context[-2] if len(context) > 1 else context[-1]), context[-1]
        tokens: list[int] = []
        probs: list[np.ndarray | None] = []
        scores: list[float] = []  # the head's probability of the whole chain up to each token
        for j in range(min(self.w.depth, max_depth)):
            u = np.concatenate([h, self.embed[prev1], self.embed[prev2]])
            a = u @ self.w.w1 + self.w.b1 + self.w.depth_bias[j]
            a = a / (1.0 + np.exp(-a))  # silu
            logits = (h + a @ self.w.w2) @ self.lm_head.T
            q = softmax(logits, self.temperature if self.temperature > 0 else 1.0)
            if self.temperature > 0:
                token = draw(q, self.rng)
                probs.append(q)
            else:
                token = int(logits.argmax())
            tokens.append(token)
            scores.append((scores[-1] if scores else 1.0) * float(q[token]))
            if float(q.max()) < self.confidence:
                break
            prev2, prev1 = prev1, token
        return Draft.chain(tokens, probs if self.temperature > 0 else None, scores)


def train_head(
    model,
    tokens: np.ndarray,
    steps: int = 300,
    depth: int = 4,
    hidden: int | None = None,
    batch: int = 16,
    seq: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> HeadWeights:
    """Fit a draft head to ``model`` (DecoderLM or TinyLM, frozen) on the 1-D token array ``tokens``."""
    import torch
    import torch.nn.functional as F

    from edgekit.runtimes.decoding.target import TorchTarget, final_hidden

    target = TorchTarget(model)  # checks the model kind; its hook collects the final hidden states
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if len(tokens) < seq + 1:
        raise UserError(f"training a draft head needs more than {seq} tokens of text, got {len(tokens)}; give a longer file")
    if steps < 1 or depth < 1 or seq <= depth + 1:
        raise UserError(f"train_head: need steps >= 1, depth >= 1 and seq > depth + 1, got {steps}, {depth}, {seq}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    embed = torch.from_numpy(target.embedding())
    lm_head = torch.from_numpy(target.head())
    vocab, dim = embed.shape
    width = hidden or 2 * dim
    w1 = torch.nn.Parameter(torch.randn(3 * dim, width) * (3 * dim) ** -0.5)
    b1 = torch.nn.Parameter(torch.zeros(width))
    w2 = torch.nn.Parameter(torch.zeros(width, dim))  # starts as h itself (the model's next-token guess); training moves it ahead
    depth_bias = torch.nn.Parameter(torch.zeros(depth, width))
    params = [w1, b1, w2, depth_bias]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for step in range(steps):
        starts = rng.integers(0, len(tokens) - seq, size=batch)
        x = torch.from_numpy(np.stack([tokens[s : s + seq] for s in starts]))
        with torch.inference_mode(), final_hidden(model) as seen:
            logits, _ = model.step(x)
            h_all = seen[-1].clone()
            greedy = logits.argmax(-1)
        h_all = h_all.detach()
        losses = []
        for j in range(depth):
            # position p's hidden state, the tokens at p+j+1 and p+j (y_0 = x_{p+1}, the pending token),
            # and the model's greedy choice after x_{p+j+1}
            n = seq - j - 1
            h = h_all[:, :n]
            u = torch.cat([h, embed[x[:, j + 1 : j + 1 + n]], embed[x[:, j : j + n]]], dim=-1)
            g = h + F.silu(u @ w1 + b1 + depth_bias[j]) @ w2
            losses.append(F.cross_entropy((g @ lm_head.t()).reshape(-1, vocab), greedy[:, j + 1 : j + 1 + n].reshape(-1)))
        loss = torch.stack(losses).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g_ in opt.param_groups:
            g_["lr"] = lr * min(1.0, (step + 1) / 20)
        opt.step()
        if log and (step % 50 == 0 or step == steps - 1):
            log(f"step {step + 1}/{steps}: loss {loss.item():.3f} (" + ", ".join(f"{v.item():.2f}" for v in losses) + " by depth)")
    return HeadWeights(w1.detach().numpy().copy(), b1.detach().numpy().copy(), w2.detach().numpy().copy(), depth_bias.detach().numpy().copy(), int(vocab))
