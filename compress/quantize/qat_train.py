"""Torch side of quantize.qat: the Conv+BN layer folded while training, and the training loop."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgekit.passes import PassContext
from edgekit.runtimes.torch_eager import call_module, flatten_outputs

from .modules import QuantConv2d, fake_quant, quant_layers


class QuantConvBn2d(QuantConv2d):
    """A quantized Conv2d with its BatchNorm folded on the fly during training."""

    def __init__(self, conv: QuantConv2d, bn: nn.BatchNorm2d):
        nn.Module.__init__(self)
        self.cfg = conv.cfg
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.register_buffer("w_scale", conv.w_scale.clone())
        self.register_buffer("w_zero", conv.w_zero.clone())
        self.register_buffer("a_scale", conv.a_scale.clone())
        self.register_buffer("a_zero", conv.a_zero.clone())
        if self.cfg.out_quant:
            self.register_buffer("o_scale", conv.o_scale.clone())
            self.register_buffer("o_zero", conv.o_zero.clone())
        self.bn = bn
        self.frozen = False

    def _sigma(self, var: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(var + self.bn.eps)

    def _gamma_beta(self) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.bn
        gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_var)
        return gamma, beta

    def effective_weight(self) -> torch.Tensor:
        gamma, _ = self._gamma_beta()
        return self.weight * (gamma / self._sigma(self.bn.running_var)).reshape(-1, 1, 1, 1)

    def folded_bias(self) -> torch.Tensor:
        gamma, beta = self._gamma_beta()
        b = self.bias if self.bias is not None else torch.zeros_like(beta)
        return beta + gamma * (b - self.bn.running_mean) / self._sigma(self.bn.running_var)

    def _refresh_weight_scale(self) -> None:
        """Per-channel scale from the current folded weight (it moves as training goes)."""
        qmin, qmax = self.cfg.w_qrange
        amax = self.effective_weight().detach().abs().flatten(1).amax(1).clamp_min(1e-8)
        self.w_scale.copy_((amax / qmax).reshape(-1, 1))

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # never exported as is: the pass turns it into its folded QuantConv2d first (to_folded)
        return self.simulate(x) if self.enabled else self.float_forward(x)

    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = self.cfg.a_qrange
        xq = fake_quant(x, self.a_scale, self.a_zero, qmin, qmax, self.training)
        if self.training:
            self._refresh_weight_scale()
        w = self.quant_weight(self.training)
        conv = lambda inp, weight: F.conv2d(inp, weight, None, self.stride, self.padding, self.dilation, self.groups)  # noqa: E731
        if not self.training or self.frozen:
            step = self.a_scale * self.w_scale[:, 0]  # the bias on the int32 grid, as deployed
            bias = fake_quant(self.folded_bias(), step, torch.zeros_like(step), -(2**31), 2**31 - 1, self.training)
            return self._quant_output(conv(xq, w) + bias.reshape(1, -1, 1, 1))
        # batch statistics of the float convolution normalise this step; the running ones fold the weight
        with torch.no_grad():
            z = conv(x, self.weight) + (self.bias.reshape(1, -1, 1, 1) if self.bias is not None else 0)
            mean, var = z.mean(dim=(0, 2, 3)), z.var(dim=(0, 2, 3), unbiased=False)
            m = self.bn.momentum if self.bn.momentum is not None else 0.1
            n = z.numel() / z.shape[1]
            self.bn.running_mean.mul_(1 - m).add_(m * mean)
            self.bn.running_var.mul_(1 - m).add_(m * var * n / max(n - 1, 1))
            self.bn.num_batches_tracked += 1
        gamma, beta = self._gamma_beta()
        sigma_b, sigma_r = self._sigma(var), self._sigma(self.bn.running_var)
        b = self.bias if self.bias is not None else torch.zeros_like(beta)
        y = conv(xq, w) * (sigma_r / sigma_b).reshape(1, -1, 1, 1)
        return self._quant_output(y + (beta + gamma * (b - mean) / sigma_b).reshape(1, -1, 1, 1))

    def to_folded(self) -> QuantConv2d:
        """The deployed layer: a QuantConv2d on the folded weight and bias, same scales."""
        with torch.no_grad():
            out_ch, in_g, kh, kw = self.weight.shape
            plain = nn.Conv2d(in_g * self.groups, out_ch, (kh, kw), self.stride, self.padding, self.dilation, self.groups)
            plain.weight = nn.Parameter(self.effective_weight().detach().clone())
            plain.bias = nn.Parameter(self.folded_bias().detach().clone())
            layer = QuantConv2d(plain, self.cfg)
            layer.w_scale.copy_(self.w_scale)  # the scales training ended with, so deployed == evaluated
            layer.a_scale.copy_(self.a_scale)
            layer.a_zero.copy_(self.a_zero)
            if self.cfg.out_quant:
                layer.o_scale.copy_(self.o_scale)
                layer.o_zero.copy_(self.o_zero)
        return layer


def attach_batchnorm(model: nn.Module) -> int:
    """Replace each (QuantConv2d, BatchNorm2d) pair of an nn.Sequential by QuantConvBn2d + Identity."""
    count = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if type(conv) is QuantConv2d and type(bn) is nn.BatchNorm2d and bn.running_mean is not None and bn.num_features == conv.weight.shape[0]:
                seq[i] = QuantConvBn2d(conv, bn)
                seq[i + 1] = nn.Identity()
                count += 1
    return count


def finalize_batchnorm(model: nn.Module) -> int:
    """Turn every QuantConvBn2d into its folded QuantConv2d (the structure fold_bn + quantize rebuilds)."""
    count = 0
    for name, layer in list(quant_layers(model).items()):
        if isinstance(layer, QuantConvBn2d):
            parent, _, attr = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, attr, layer.to_folded())
            count += 1
    return count


def train(model: nn.Module, split, names: list[str], cfg, ctx: PassContext, teacher: nn.Module | None = None) -> dict[str, Any]:
    """Fine-tune; one checkpoint per epoch in the cache, resumed when present.

    The loss is cross-entropy to the labels, or, with a ``teacher`` (the float
    model), the squared error to its outputs relative to their energy: the
    quantized model learns to reproduce the float one, no labels needed.
    """
    started = time.perf_counter()
    torch.manual_seed(ctx.seed)
    x = {n: torch.from_numpy(split.arrays[n]) for n in names}
    y = torch.from_numpy(split.labels) if teacher is None else None
    n = len(next(iter(x.values())))
    if teacher is not None:
        teacher.eval()
    steps_per_epoch = (n + cfg.batch_size - 1) // cfg.batch_size
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    folder = ctx.cache_dir / "qat" / ctx.key if (ctx.cache_dir and ctx.key) else None
    start_epoch = _resume(model, opt, sched, folder, ctx)
    gen = torch.Generator().manual_seed(ctx.seed)
    for _ in range(start_epoch):
        torch.randperm(n, generator=gen)  # the same shuffles as an uninterrupted run
    epochs = range(start_epoch, cfg.epochs)
    if ctx.progress:
        epochs = ctx.progress(epochs, description="QAT", total=cfg.epochs - start_epoch)
    losses = []
    for epoch in epochs:
        model.train()
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, cfg.batch_size):
            step = epoch * steps_per_epoch + i // cfg.batch_size
            _freeze(model, step >= cfg.freeze_bn_after)
            idx = order[i : i + cfg.batch_size]
            inputs = [x[k][idx] for k in names]
            out = flatten_outputs(call_module(model, dict(zip(names, inputs)), names))[0]
            if teacher is None:
                loss = F.cross_entropy(out, y[idx])
            else:
                with torch.no_grad():
                    target = flatten_outputs(call_module(teacher, dict(zip(names, inputs)), names))[0]
                loss = F.mse_loss(out, target) / target.pow(2).mean().clamp_min(1e-12)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        losses.append(round(total / n, 5))
        if folder is not None:
            _checkpoint(model, opt, sched, folder, epoch + 1)
    model.eval()
    return {
        "epochs": cfg.epochs,
        "resumed_from_epoch": start_epoch,
        "steps": cfg.epochs * steps_per_epoch,
        "freeze_bn_after": cfg.freeze_bn_after,
        "loss": "distill" if teacher is not None else "labels",
        "loss_per_epoch": losses,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _freeze(model: nn.Module, frozen: bool) -> None:
    for m in model.modules():
        if isinstance(m, QuantConvBn2d):
            m.frozen = frozen


def _checkpoint(model, opt, sched, folder, epoch: int) -> None:
    from edgekit.fsio import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "last.pt") as tmp:
        torch.save({"epoch": torch.tensor(epoch), "model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, tmp)


def _resume(model, opt, sched, folder, ctx: PassContext) -> int:
    if folder is None or not (folder / "last.pt").is_file():
        return 0
    try:
        state = torch.load(folder / "last.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
    except Exception as e:  # a damaged checkpoint: start over rather than fail
        ctx.log(f"  quantize.qat: ignoring checkpoint ({type(e).__name__}); training from the start")
        return 0
    epoch = int(state["epoch"])
    ctx.log(f"  quantize.qat: resuming after epoch {epoch}")
    return epoch
