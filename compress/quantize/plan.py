"""Which layers get quantized, and how: the plan a PTQ or QAT pass starts from.

A plan maps layer names to :class:`LayerConfig`. Layers the runtimes have no
integer kernel for, or that the user listed in ``skip``, stay float and are
listed with the reason, so the report can say what was left alone.
"""

from __future__ import annotations

import fnmatch
import platform
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .modules import LayerConfig


@dataclass
class Plan:
    layers: dict[str, LayerConfig] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # layer name -> reason

    def as_builder_args(self) -> dict:
        return {"layers": {n: c.to_dict() for n, c in self.layers.items()}}


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has int8 dot-product instructions (no saturation in u8 x s8 kernels)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True  # ARM and others: no int16 pair saturation in their int8 kernels
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags


def resolve_reduce_range(setting: str | bool) -> bool:
    return (not cpu_has_vnni()) if setting == "auto" else bool(setting)


def _group_size(wanted: int, features: int) -> int | None:
    """The largest power-of-two block <= wanted (>= 16, as MatMulNBits needs) dividing ``features``."""
    g = wanted
    while g >= 16:
        if features % g == 0:
            return g
        g //= 2
    return None


def matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def build_plan(
    model: nn.Module,
    *,
    bits: int,
    group_size: int,
    symmetric: bool,
    linear_mode: str,
    act_symmetric: bool,
    reduce_range: bool,
    embeddings: bool,
    convolutions: bool,
    skip: list[str],
    smooth: bool = False,
) -> Plan:
    plan = Plan()
    for name, m in model.named_modules():
        if not name:
            continue
        kind = type(m)
        if kind not in (nn.Linear, nn.Conv2d, nn.Embedding):
            continue
        if matches(name, skip):
            plan.skipped[name] = "in the skip list"
            continue
        if kind is nn.Embedding:
            if not embeddings:
                plan.skipped[name] = "embeddings: false"
                continue
            g = _group_size(group_size if bits == 4 else 128, m.embedding_dim)
            if g is None:
                plan.skipped[name] = f"embedding dim {m.embedding_dim} is not a multiple of 16"
                continue
            plan.layers[name] = LayerConfig("weight_only", bits, g, symmetric)
        elif kind is nn.Conv2d:
            if not convolutions:
                plan.skipped[name] = "convolutions: false"
            elif m.padding_mode != "zeros" or isinstance(m.padding, str):
                plan.skipped[name] = f"padding {m.padding!r} / {m.padding_mode} has no integer kernel"
            else:
                # 4-bit conv weights run as W4A8 on int8 kernels (no runtime has 4-bit conv kernels)
                plan.layers[name] = LayerConfig("static", bits, 0, True, act_symmetric, reduce_range, out_quant=True)
        else:
            mode = linear_mode if linear_mode != "none" else "weight_only"
            if bits == 4 and mode != "weight_only":
                mode = "weight_only"  # 4-bit linear weights run on MatMulNBits (float activations)
            if mode == "weight_only":
                g = _group_size(group_size, m.in_features)
                if g is None:
                    plan.skipped[name] = f"in_features {m.in_features} is not a multiple of 16 (needed for 4-bit blocks)"
                    continue
                plan.layers[name] = LayerConfig("weight_only", bits, g, symmetric)
            else:
                plan.layers[name] = LayerConfig(mode, bits, 0, True, act_symmetric, reduce_range, smooth)
    return plan


def with_bits(cfg: LayerConfig, bits: int) -> LayerConfig:
    return replace(cfg, bits=bits)


def estimated_bytes(model: nn.Module) -> int:
    """Deployed weight bytes: quantized weights at their bit width plus scales, the rest float32."""
    from .modules import quant_layers

    quant = quant_layers(model)
    quant_weights = {id(m.weight) for m in quant.values()}
    total = 0.0
    seen: set[int] = set()
    for m in quant.values():
        c = m.cfg
        stored_bits = 8 if c.mode == "static" else c.bits  # 4-bit conv weights travel in int8 (W4A8)
        total += m.weight.numel() * stored_bits / 8 + m.w_scale.numel() * 4
        if not c.symmetric:
            total += m.w_zero.numel() * c.bits / 8
        seen.add(id(m.weight))
    for p in list(model.parameters()) + list(model.buffers()):
        if id(p) in seen or id(p) in quant_weights or p.dtype not in (torch.float32, torch.float16):
            continue
        if any(p is getattr(m, b, None) for m in quant.values() for b in ("w_scale", "w_zero", "a_scale", "a_zero")):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return int(total)


def integer_summary(model: nn.Module) -> dict:
    """How many weight layers run in which integer form, and how many stay float."""
    from .modules import quant_layers

    quant = quant_layers(model)
    by_mode: dict[str, int] = {}
    for m in quant.values():
        key = f"{m.cfg.mode}-{m.cfg.bits}bit"
        by_mode[key] = by_mode.get(key, 0) + 1
    float_layers = sum(1 for _, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d, nn.Embedding))
    return {"integer_layers": len(quant), "float_layers": float_layers, "by_mode": by_mode}
