"""``quantize.ptq``: post-training quantization of torch models (and of ONNX-only models).

Torch models, in order:

1. fold BatchNorm into the layer before it;
2. plan: which Linear / Conv2d / Embedding layers get which integer form;
3. calibrate on the recipe's calibration split (input ranges, input energy);
4. weight scales per output channel or block, with a clipping search;
5. latency-aware placement: layers slower in integer than in float on ONNX
   Runtime go back to float;
6. bias correction;
7. on the eval split: the metric of the float and quantized model, per-layer
   sensitivity, and the ``max_drop`` loop that moves the most sensitive layers
   to higher precision until the budget holds (``size_budget`` does the
   opposite for size);
8. a per-layer SQNR table ("which layer broke it?").

The result is a torch artifact whose builder records the BN folding and the
plan, so it reloads as the same quantized model, and whose layers export to
integer ONNX. ONNX-only artifacts go through :mod:`.onnx_graph`; ``backend:
nncf`` hands the (exported) ONNX model to NNCF.
"""

from __future__ import annotations

import copy
import os
from dataclasses import replace
from typing import Any


from edgekit.artifact import Artifact
from edgekit.errors import UserError
from edgekit.passes import Pass, PassContext

from .config import QuantizeSettings


class QuantizePTQ(Pass):
    """Post-training int8 / 4-bit quantization with calibration, sensitivity and an accuracy budget."""

    name = "quantize.ptq"
    kind = "compress"
    Config = QuantizeSettings
    accepts = ("torch", "onnx")
    uses_data = ("calibration", "eval")

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        cfg: QuantizeSettings = self.config
        if cfg.backend == "nncf":
            from .nncf_backend import quantize_with_nncf

            return quantize_with_nncf(artifact, cfg, ctx)
        if artifact.format == "onnx":
            return _quantize_onnx_artifact(artifact, cfg, ctx)
        quantizer = TorchQuantizer(artifact, cfg, ctx)
        quantizer.prepare()
        quantizer.finish()
        return quantizer.result()


class TorchQuantizer:
    """The torch PTQ steps, shared with QAT (which trains between prepare and result)."""

    def __init__(self, artifact: Artifact, cfg: QuantizeSettings, ctx: PassContext):
        self.artifact, self.cfg, self.ctx = artifact, cfg, ctx
        self.names = [s.name for s in artifact.inputs]
        self.metrics: dict[str, Any] = {}
        self.transforms = list((artifact.builder or {}).get("transforms", []))

    # -- plan, wrap, calibrate ------------------------------------------------------
    def prepare(self, model=None, qat: bool = False) -> None:
        """Plan, wrap and calibrate. With ``qat`` Conv+BN pairs stay unfolded (QAT folds them while
        training) and latency placement and bias correction are left to the caller."""
        import torch

        from .bn_fold import fold_batchnorm
        from .calibrate import collect_stats, set_qparams
        from .modules import apply_plan, quant_layers
        from .plan import build_plan, resolve_reduce_range

        cfg, ctx = self.cfg, self.ctx
        model = copy.deepcopy(model if model is not None else self.artifact.torch_module()).eval()
        self.float_model = copy.deepcopy(model)
        if cfg.fold_bn:
            if not qat:
                model = fold_batchnorm(model)
            self.transforms.append({"kind": "fold_bn"})
        self.reduce_range = resolve_reduce_range(cfg.weights.reduce_range)
        self.plan = build_plan(
            model, bits=cfg.weights.bits, group_size=cfg.weights.group_size, symmetric=cfg.weights.symmetric,
            linear_mode=cfg.activations.linear, act_symmetric=cfg.activations.symmetric,
            reduce_range=self.reduce_range, embeddings=cfg.embeddings, convolutions=cfg.convolutions, skip=cfg.skip,
            smooth=cfg.activations.smooth is not None,
        )
        if not self.plan.layers:
            raise UserError(
                "quantize.ptq found no Linear, Conv2d or Embedding layer to quantize"
                + (f" (left float: {_first(self.plan.skipped)})" if self.plan.skipped else "")
                + "; check the skip list or the model"
            )
        apply_plan(model, {n: c.to_dict() for n, c in self.plan.layers.items()})
        if qat and cfg.fold_bn:
            from .qat_train import attach_batchnorm

            attach_batchnorm(model)
        self.model = model
        self.original_bias = {
            n: (m.bias.detach().clone() if m.bias is not None else None) for n, m in quant_layers(model).items()
        }
        n = cfg.activations.samples
        if ctx.data is not None and ctx.data.has_split("calibration"):
            n = min(n, len(ctx.data.split("calibration")))  # the pipeline cycles a short split; repeats add nothing
        self.feeds = ctx.samples(n) if ctx.samples else []
        if not self.feeds:
            raise UserError("quantize.ptq needs calibration samples; add a data: section (data.calibration)")
        ctx.log(f"  calibrating {len(self.plan.layers)} layers on {len(self.feeds)} samples ({cfg.activations.calibration})")
        self.stats = collect_stats(model, self.feeds, self.names, cfg.activations.calibration, cfg.activations.percentile)
        alphas = set_qparams(model, self.stats, cfg.weights.clip_search, cfg.activations.smooth)
        if alphas:
            self.metrics["smoothing"] = alphas
        self.original_weight = {}
        if cfg.weights.gptq:
            self._gptq()
        torch.manual_seed(ctx.seed)

    def _gptq(self) -> None:
        from .calibrate import gptq
        from .modules import quant_layers

        errors = {}
        for name, layer in quant_layers(self.model).items():
            st = self.stats.get(name)
            if st is not None and st.hessian is not None and st.count:
                self.original_weight[name] = layer.weight.detach().clone()
                errors[name] = round(gptq(layer, st), 6)
        if errors:
            self.ctx.log(f"  GPTQ on {len(errors)} 4-bit layers (mean relative output error {sum(errors.values()) / len(errors):.4f})")
            self.metrics["gptq_rel_error"] = errors

    def _place_by_latency(self) -> None:
        from .latency import place_by_latency

        threads = self.cfg.latency_threads or os.cpu_count() or 1
        self.ctx.log(f"  timing integer vs float blocks on ONNX Runtime ({threads} threads, batch 1)")
        # the named dims export.onnx makes dynamic by default
        dynamic = {s.name: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)} for s in self.artifact.inputs}
        slower, record = place_by_latency(self.model, self.names, self.feeds[0], threads, self.cfg.latency_margin, self.ctx.log,
                                          {k: v for k, v in dynamic.items() if v})
        for name in slower:
            self._set_layer(name, None)
            self.plan.skipped[name] = "slower in integer than in float on ONNX Runtime here"
        self.metrics["latency"] = record
        if record["speedup"] < 1:
            self.ctx.log(f"  [yellow]the quantized model is slower than float here ({record['speedup']:.2f}x at batch 1)[/yellow]")

    def _correct_bias(self, names: list[str]) -> None:
        from .calibrate import correct_bias
        from .modules import QuantConv2d, quant_layers

        if self.cfg.bias_correction is False:
            return
        layers = quant_layers(self.model)
        if self.cfg.bias_correction == "auto":
            names = [n for n in names if isinstance(layers.get(n), QuantConv2d)]
        correct_bias(self.model, self.stats, names)

    def _set_layer(self, name: str, layer_cfg) -> None:
        """Put layer ``name`` back to float (``None``) or re-quantize it with another config."""
        import torch
        from torch import nn

        from .calibrate import set_qparams
        from .modules import QuantConv2d, QuantEmbedding, quant_layers, wrap

        old = quant_layers(self.model)[name]
        bias = self.original_bias.get(name)
        if isinstance(old, QuantEmbedding):
            plain = nn.Embedding(old.weight.shape[0], old.weight.shape[1], padding_idx=old.padding_idx)
        elif isinstance(old, QuantConv2d):
            out_ch, in_g, kh, kw = old.weight.shape
            plain = nn.Conv2d(in_g * old.groups, out_ch, (kh, kw), old.stride, old.padding, old.dilation, old.groups, bias=bias is not None)
        else:
            plain = nn.Linear(old.in_features, old.out_features, bias=bias is not None)
        with torch.no_grad():
            plain.weight = old.weight
            if name in self.original_weight:  # GPTQ replaced the weight by its 4-bit values
                plain.weight = nn.Parameter(self.original_weight.pop(name))
            if bias is not None:
                plain.bias = nn.Parameter(bias.clone())
        parent, _, attr = name.rpartition(".")
        owner = self.model.get_submodule(parent) if parent else self.model
        if layer_cfg is None:
            setattr(owner, attr, plain)
            self.plan.layers.pop(name, None)
            return
        new = wrap(plain, layer_cfg)
        setattr(owner, attr, new)
        self.plan.layers[name] = layer_cfg
        stats = {name: self.stats[name]} if name in self.stats else {}
        set_qparams(self.model, stats, self.cfg.weights.clip_search, self.cfg.activations.smooth, names=[name])
        self._correct_bias([name])

    # -- 7: accuracy ---------------------------------------------------------------
    def finish(self, qat: bool = False) -> None:
        """Bias correction, analysis of the all-integer model, latency placement and the budgets.

        Sensitivity and the SQNR table describe the model with every planned layer in
        integer, so the report shows where quantization hurts even for layers that
        end up float; each row then says which form the layer finally has.
        """
        from .analysis import debug_table, layer_sqnr, metric_drop, sensitivity
        from .modules import quant_layers

        cfg, ctx = self.cfg, self.ctx
        if not qat:
            self._correct_bias(list(quant_layers(self.model)))
        has_eval = ctx.data is not None and ctx.data.has_split("eval")
        if cfg.max_drop is not None and not has_eval:
            raise UserError(f"{self._name} max_drop is measured on the eval split, but the recipe has none; add data.eval (or a holdout) or remove max_drop")
        drops = None
        if has_eval:
            if not hasattr(self, "split"):
                self._setup_eval()
            value = self._evaluate()
            self.metrics["accuracy"] = {"metric": self.metric, "float": _r(self.baseline), "all_integer": _r(value),
                                        "quantized": _r(value), "drop": _r(metric_drop(self.metric, self.baseline, value))}
            ctx.log(f"  {self.metric}: float {self.baseline:.4f} -> all layers integer {value:.4f}")
            if cfg.sensitivity or cfg.max_drop is not None or cfg.size_budget is not None:
                names = list(quant_layers(self.model))
                drops = sensitivity(self.model, names, self._evaluate, self.metric, self.baseline, ctx.progress)
                self.metrics["sensitivity"] = {"metric": self.metric, "drops": drops}
        sqnr = layer_sqnr(self.model, self.feeds[:8], self.names)
        rows = debug_table(self.model, sqnr, drops)
        if cfg.latency_aware:
            self._place_by_latency()
        if has_eval:
            if cfg.size_budget is not None:
                self._meet_size_budget(drops or {})
            if cfg.max_drop is not None:
                self._meet_max_drop(drops or {})
            value = self._evaluate()
            self.metrics["accuracy"].update(quantized=_r(value), drop=_r(metric_drop(self.metric, self.baseline, value)))
        final = quant_layers(self.model)
        for r in rows:
            layer = final.get(r["layer"])
            r["final"] = f"{layer.cfg.mode} {layer.cfg.bits}-bit" if layer is not None else f"float ({self.plan.skipped.get(r['layer'], 'kept float')})"
        self.metrics["layers"] = rows

    @property
    def _name(self) -> str:
        return "quantize.qat" if "qat" in self.metrics else "quantize.ptq"

    def _setup_eval(self) -> None:
        from edgekit.evaluate import choose_metric, run_outputs

        self.split = self.ctx.data.split("eval")
        requested = getattr(getattr(getattr(self.ctx.data, "section", None), "eval", None), "metric", None)
        self.metric = choose_metric(requested, self.artifact.task, self.split.labels is not None)
        float_art = self.artifact.derive(module=self.float_model)
        self.reference = None if self.metric in ("top1", "perplexity") else run_outputs(float_art, self.split, 32 if self._dynamic_batch else 1)
        self.baseline = self._evaluate(self.float_model)

    @property
    def _dynamic_batch(self) -> bool:
        return isinstance(self.artifact.inputs[0].shape[0], str)

    def _evaluate(self, model=None) -> float:
        from edgekit.evaluate import evaluate

        art = self.artifact.derive(module=model if model is not None else self.model)
        return float(evaluate(art, self.split, self.metric, self.reference)["value"])

    def _meet_max_drop(self, drops: dict[str, float]) -> None:
        """Move the most sensitive layers up (4-bit -> 8-bit -> float) until the drop fits the budget."""
        from .analysis import metric_drop

        allowed = self.cfg.max_drop.allowed(self.baseline)
        rounds = []
        value = self._evaluate()
        order = sorted(drops, key=lambda n: -drops[n])
        while metric_drop(self.metric, self.baseline, value) > allowed + 1e-6 and order:
            name = order[0]
            cfg = self.plan.layers.get(name)
            if cfg is None:
                order.pop(0)
                continue
            if cfg.bits == 4:
                self._set_layer(name, replace(cfg, bits=8))
                action = "4-bit -> 8-bit"
            else:
                self._set_layer(name, None)
                self.plan.skipped[name] = "moved to float by max_drop"
                order.pop(0)
                action = "8-bit -> float"
            value = self._evaluate()
            rounds.append({"layer": name, "action": action, "value": _r(value), "drop": _r(metric_drop(self.metric, self.baseline, value))})
        final = metric_drop(self.metric, self.baseline, value)
        met = final <= allowed + 1e-6  # float round-off (e.g. of BN folding) must not fail a budget of 0
        self.metrics["max_drop"] = {"allowed": _r(allowed), "final_drop": _r(final), "met": met, "rounds": rounds}
        if met:
            self.ctx.log(f"  max_drop {allowed:.4g} holds after {len(rounds)} back-off rounds (drop {final:.4g})")
        else:
            self.ctx.log(f"  [yellow]max_drop {allowed:.4g} cannot be met: drop {final:.4g} with every layer backed off[/yellow]")

    def _meet_size_budget(self, drops: dict[str, float]) -> None:
        """Drop 8-bit layers to 4-bit, least sensitive first, until the estimated size fits."""
        from .plan import estimated_bytes

        from edgekit.artifact import torch_state_bytes

        float_bytes = torch_state_bytes(self.float_model)
        budget = self.cfg.size_budget * float_bytes
        lowered = []
        for name in sorted(drops, key=lambda n: drops[n]):
            if estimated_bytes(self.model) <= budget:
                break
            cfg = self.plan.layers.get(name)
            if cfg is None or cfg.bits == 4 or cfg.mode == "static":
                continue  # static layers stay int8 (4-bit convolution weights would still be stored in int8)
            new = replace(cfg, bits=4, mode="weight_only", group_size=self.cfg.weights.group_size) if cfg.mode == "dynamic" else replace(cfg, bits=4)
            if new.mode == "weight_only" and not _fits_blocks(self.model, name, new.group_size):
                continue
            self._set_layer(name, new)
            lowered.append(name)
        size = estimated_bytes(self.model)
        self.metrics["size_budget"] = {
            "budget_bytes": int(budget), "estimated_bytes": int(size), "met": size <= budget, "lowered_to_4bit": lowered,
        }
        if size > budget:
            self.ctx.log(f"  [yellow]size_budget cannot be met: {size / 1e6:.1f} MB > {budget / 1e6:.1f} MB with every layer at 4 bits[/yellow]")

    # -- result --------------------------------------------------------------------
    def result(self) -> Artifact:
        from .modules import quant_layers
        from .plan import estimated_bytes, integer_summary

        self.transforms.append({"kind": "quantize", "args": self.plan.as_builder_args()})
        builder = dict(self.artifact.builder or {})
        builder["transforms"] = self.transforms
        summary = integer_summary(self.model)
        self.metrics.update(
            quantized_layers=len(quant_layers(self.model)),
            skipped={n: r for n, r in self.plan.skipped.items()},
            reduce_range=self.reduce_range,
            integer=summary,
            estimated_deploy_bytes=int(estimated_bytes(self.model)),
        )
        self.ctx.metrics["quantize"] = self.metrics
        meta = dict(self.artifact.meta)
        meta["quantized"] = {"bits": self.cfg.weights.bits, "layers": len(quant_layers(self.model))}
        return self.artifact.derive(module=self.model.eval(), builder=builder, meta=meta)


def _fits_blocks(model, name: str, group: int) -> bool:
    layer = model.get_submodule(name)
    return layer.weight.shape[1] % group == 0


def _first(d: dict[str, str]) -> str:
    k = next(iter(d))
    return f"{k}: {d[k]}" + (f" and {len(d) - 1} more" if len(d) > 1 else "")


def _r(v: float) -> float:
    return round(float(v), 6)


# -- ONNX-only models ------------------------------------------------------------------

def _quantize_onnx_artifact(artifact: Artifact, cfg: QuantizeSettings, ctx: PassContext) -> Artifact:
    import onnx

    from edgekit.export.onnx import EXTERNAL_DATA_BYTES, _save

    from .onnx_graph import quantize_onnx
    from .plan import resolve_reduce_range

    if cfg.weights.bits != 8:
        raise UserError("quantize.ptq on an ONNX model supports weights.bits: 8; export from torch for 4-bit, or use backend: nncf")
    model = onnx.load(str(artifact.path("model")))
    feeds = ctx.samples(cfg.activations.samples) if ctx.samples else []
    quantized, report = quantize_onnx(
        model, feeds, reduce_range=resolve_reduce_range(cfg.weights.reduce_range), skip=cfg.skip, static_conv=cfg.convolutions
    )
    files = _save(quantized, ctx.workdir, large=quantized.ByteSize() > EXTERNAL_DATA_BYTES)
    ctx.metrics["quantize"] = {
        "backend": "edgekit-onnx",
        "quantized_layers": len(report["quantized"]),
        "skipped": {s["node"]: s["reason"] for s in report["skipped"]},
        "normalize": report["normalize"],
        "integer": report["integer_ops"],
    }
    if report["skipped"]:
        ctx.log(f"  {len(report['skipped'])} weight ops left float: " + "; ".join(f"{s['node']} ({s['reason']})" for s in report["skipped"][:5]))
    return artifact.derive(folder=ctx.workdir, files=files)
