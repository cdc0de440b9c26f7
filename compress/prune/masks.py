"""Variational information-bottleneck masks (VIBNet, as VTrans uses them).

Each prunable unit j (a hidden dimension, an attention head, an FFN neuron)
gets a mean ``mu_j`` and a log-variance ``log_var_j``. While training, the
unit's activation is multiplied by ``z = mu + eps * sigma`` with
``eps ~ N(0, 1)`` drawn per sample; the information the unit passes on is
bounded by ``KL_j = 0.5 * log(1 + mu_j^2 / sigma_j^2)``. A unit is kept while
``log_alpha_j = log(sigma_j^2) - log(mu_j^2) < 0``; at inference kept units
are scaled by ``mu`` and the rest are zero, which is exactly what
:func:`~.structure.cut` builds into the weights.

:class:`MaskSet` holds one hidden mask shared by the whole residual stream, and
a head mask and an FFN mask per layer, and attaches them to a model with
forward hooks. With the hidden mask on, the model's LayerNorms compute their
statistics over the kept dimensions only and zero the rest, so that cutting
the pruned dimensions out changes no output.
"""

from __future__ import annotations

import torch
from torch import nn

from .structure import Keep, TransformerView

EPS = 1e-8


class VIBMask(nn.Module):
    def __init__(self, n: int, init_log_alpha: float = -2.0):
        super().__init__()
        self.mu = nn.Parameter(1.0 + 0.01 * torch.randn(n))
        self.log_var = nn.Parameter(init_log_alpha + 0.01 * torch.randn(n))

    def __len__(self) -> int:
        return self.mu.numel()

    def log_alpha(self) -> torch.Tensor:
        return self.log_var - torch.log(self.mu.pow(2) + EPS)

    def keep(self) -> torch.Tensor:
        """The keep rule: a boolean per unit."""
        return self.log_alpha().detach() < 0

    def kl(self) -> torch.Tensor:
        """KL per unit (a vector)."""
        return 0.5 * torch.log1p(self.mu.pow(2) / (self.log_var.exp() + EPS))

    def soft_keep(self, sharpness: float = 1.0) -> torch.Tensor:
        """A differentiable keep probability: a sigmoid of the same log-ratio."""
        return torch.sigmoid(-sharpness * self.log_alpha())

    def sample(self, batch: int) -> torch.Tensor:
        """z for ``batch`` samples, [batch, n]."""
        eps = torch.randn(batch, len(self), device=self.mu.device)
        return self.mu + eps * (0.5 * self.log_var).exp()

    def inference(self) -> torch.Tensor:
        """z at inference, [1, n]: mu where kept, 0 elsewhere."""
        return (self.mu * self.keep()).unsqueeze(0)

    @torch.no_grad()
    def force(self, keep: torch.Tensor, margin: float = 1.0) -> None:
        """Move log_var so the keep rule gives exactly ``keep`` (mu, the learned scale, stays)."""
        log_mu2 = torch.log(self.mu.pow(2) + EPS)
        wrong_keep = keep & (self.log_alpha() >= 0)
        wrong_drop = ~keep & (self.log_alpha() < 0)
        self.log_var[wrong_keep] = log_mu2[wrong_keep] - margin
        self.log_var[wrong_drop] = log_mu2[wrong_drop] + margin


class MaskedLayerNorm(nn.Module):
    """LayerNorm with statistics over the kept hidden dims only; pruned dims are output as 0."""

    def __init__(self, norm: nn.LayerNorm, masks: "MaskSet"):
        super().__init__()
        self.norm = norm
        object.__setattr__(self, "_masks", masks)  # a reference, not a submodule

    def forward(self, x):
        k = self._masks.hidden_keep().to(x.dtype)
        n = k.sum().clamp(min=1.0)
        mean = (x * k).sum(-1, keepdim=True) / n
        centred = (x - mean) * k
        var = centred.pow(2).sum(-1, keepdim=True) / n
        y = centred / torch.sqrt(var + self.norm.eps) * self.norm.weight
        if self.norm.bias is not None:
            y = y + self.norm.bias
        return y * k


class MaskSet(nn.Module):
    """The VIB masks of one model and the hooks that apply them."""

    def __init__(self, view: TransformerView, prune_hidden: bool, init_log_alpha: float = -2.0):
        super().__init__()
        self.head_dim = view.head_dim
        self.hidden = VIBMask(view.hidden, init_log_alpha) if prune_hidden else None
        self.heads = nn.ModuleList([VIBMask(lv.heads, init_log_alpha) for lv in view.layers])
        self.ffn = nn.ModuleList([VIBMask(lv.ffn, init_log_alpha) for lv in view.layers])
        self.sampling = True  # sample z while the model is in train mode
        self._view = view
        self._handles: list = []
        self._norms: list[tuple[nn.Module, str, nn.Module]] = []
        self._z: dict[int, torch.Tensor] = {}

    # -- attaching -----------------------------------------------------------------
    def attach(self) -> "MaskSet":
        view = self._view
        self._handles.append(view.hf.register_forward_pre_hook(self._new_forward))
        for i, lv in enumerate(view.layers):
            if lv.attn_out is not None and lv.heads:
                self._handles.append(lv.attn_out.register_forward_pre_hook(self._unit_hook(self.heads[i], self.head_dim)))
                self._handles.append(lv.attn_out.register_forward_hook(self._output_hook(self.heads[i])))
            if lv.ffn_out is not None and lv.ffn:
                self._handles.append(lv.ffn_out.register_forward_pre_hook(self._unit_hook(self.ffn[i], 1)))
                self._handles.append(lv.ffn_out.register_forward_hook(self._output_hook(self.ffn[i])))
        if self.hidden is not None:
            for m in view.embedding_modules():
                self._handles.append(m.register_forward_hook(self._embedding_hook))
            for parent, attr in view.hidden_norms():
                norm = getattr(parent, attr)
                setattr(parent, attr, MaskedLayerNorm(norm, self))
                self._norms.append((parent, attr, norm))
        return self

    def detach(self) -> None:
        """Remove the hooks and restore the plain LayerNorms."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for parent, attr, norm in self._norms:
            setattr(parent, attr, norm)
        self._norms.clear()

    # -- hooks ---------------------------------------------------------------------
    def _new_forward(self, module, args):
        self._z = {}

    def _active(self) -> bool:
        return self.sampling and self._view.hf.training

    def _z_for(self, mask: VIBMask, batch: int) -> torch.Tensor:
        key = id(mask)
        if key not in self._z:
            self._z[key] = mask.sample(batch) if self._active() else mask.inference()
        return self._z[key]

    def hidden_keep(self) -> torch.Tensor:
        return self.hidden.keep()

    def _unit_hook(self, mask: VIBMask, width: int):
        def hook(module, args):
            x = args[0]
            z = self._z_for(mask, x.shape[0])
            shape = (z.shape[0],) + (1,) * (x.dim() - 2) + (len(mask), 1)
            scaled = (x.reshape(*x.shape[:-1], len(mask), width) * z.reshape(shape)).reshape(x.shape)
            return (scaled,) + tuple(args[1:])

        return hook

    def _output_hook(self, mask: VIBMask):
        def hook(module, args, out):
            if not bool(mask.keep().any()):
                out = out * 0.0  # a sublayer with nothing kept is removed whole (bias included)
            return self._scale_hidden(out)

        return hook

    def _embedding_hook(self, module, args, out):
        return self._scale_hidden(out)

    def _scale_hidden(self, out):
        if self.hidden is None:
            return out
        z = self._z_for(self.hidden, out.shape[0])
        return out * z.reshape((z.shape[0],) + (1,) * (out.dim() - 2) + (z.shape[-1],))

    # -- losses and shapes ---------------------------------------------------------
    def groups(self) -> dict[str, list[VIBMask]]:
        g = {"heads": [m for m in self.heads if len(m)], "ffn": [m for m in self.ffn if len(m)]}
        if self.hidden is not None:
            g["hidden"] = [self.hidden]
        return g

    def kl(self, scales: dict[str, float]) -> torch.Tensor:
        """The KL term: sum over units, each mask type weighted, divided by the unit count."""
        total, units = 0.0, 0
        for kind, masks in self.groups().items():
            for m in masks:
                total = total + scales.get(kind, 1.0) * m.kl().sum()
                units += len(m)
        return total / max(units, 1)

    def soft_shape(self, sharpness: float) -> tuple[torch.Tensor | float, list[torch.Tensor], list[torch.Tensor]]:
        hidden = self.hidden.soft_keep(sharpness).sum() if self.hidden is not None else float(self._view.hidden)
        heads = [m.soft_keep(sharpness).sum() if len(m) else torch.zeros(()) for m in self.heads]
        ffn = [m.soft_keep(sharpness).sum() if len(m) else torch.zeros(()) for m in self.ffn]
        return hidden, heads, ffn

    def hard_shape(self) -> dict:
        hidden = int(self.hidden.keep().sum()) if self.hidden is not None else self._view.hidden
        return {
            "family": self._view.family,
            "hidden": hidden,
            "layers": [{"heads": int(h.keep().sum()), "ffn": int(f.keep().sum())} for h, f in zip(self.heads, self.ffn)],
        }

    def keep(self) -> Keep:
        """Kept indices and their mu scales, for :func:`~.structure.cut`."""

        def idx(m: VIBMask):
            return torch.nonzero(m.keep(), as_tuple=False).flatten()

        def scale(m: VIBMask):
            return m.mu.detach()[idx(m)]

        hidden = idx(self.hidden) if self.hidden is not None else None
        return Keep(
            hidden=hidden,
            heads=[idx(m) for m in self.heads],
            ffn=[idx(m) for m in self.ffn],
            hidden_scale=scale(self.hidden) if self.hidden is not None else None,
            head_scale=[scale(m) for m in self.heads],
            ffn_scale=[scale(m) for m in self.ffn],
        )
