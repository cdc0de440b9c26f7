"""Pure-torch BlockFFN router and experts in float64: the oracle the C kernels are tested against.

Written for clarity, not speed: every expert is computed for every token and
multiplied by its score, exactly as the math in the issue states it.
"""

from __future__ import annotations

import numpy as np

ACTIVATIONS = ("relu", "silu", "gelu")


def _t(a):
    import torch

    if a is None:
        return None
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float64)
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


def reference_router(x, router_w, router_b=None, norm_w=None, eps: float = 1e-6) -> np.ndarray:
    """scores = relu(x W^T + b) / sqrt(mean_e(relu(.)^2) + eps) * norm_w, float32 (L, E) (or (E,) for one token)."""
    import torch

    xt, w = _t(x), _t(router_w)
    s = torch.relu(xt @ w.T + (_t(router_b) if router_b is not None else 0.0))
    scores = s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + eps)
    if norm_w is not None:
        scores = scores * _t(norm_w)
    return scores.to(torch.float32).numpy()


def reference_experts(x, scores, up, down, up_bias=None, out_bias=None, activation: str = "silu") -> np.ndarray:
    """y[t] = sum_e scores[t, e] * down[e]^T act(up[e] x[t] + up_bias[e]) + out_bias, float32 (L, d) (or (d,))."""
    import torch

    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    xt, st, u, dn = _t(x), _t(scores), _t(up), _t(down)
    pre = torch.einsum("ebd,...d->...eb", u, xt)
    if up_bias is not None:
        pre = pre + _t(up_bias)
    act = {"relu": torch.relu, "silu": torch.nn.functional.silu,
           "gelu": lambda v: torch.nn.functional.gelu(v, approximate="none")}[activation]
    h = act(pre) * st.unsqueeze(-1)
    y = torch.einsum("...eb,ebd->...d", h, dn)
    if out_bias is not None:
        y = y + _t(out_bias)
    return y.to(torch.float32).numpy()
