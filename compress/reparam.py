"""``reparam``: rewrite a trained model into its deploy form and prove it unchanged.

Runs :func:`edgekit.models.reparam.deploy` (each module's ``reparameterize``
plus Conv + BatchNorm folding), then compares the deploy form with the
training form (eval mode) on the recipe's calibration samples and on random
inputs. The step fails, keeping nothing, when any output differs by more
than ``rtol`` of that output's largest magnitude; the report records the
difference, the parameter count before and after, and what was rewritten.
"""

from __future__ import annotations

import copy

import numpy as np
from pydantic import Field

from edgekit.artifact import Artifact
from edgekit.errors import StepFailed, UserError
from edgekit.passes import Pass, PassConfig, PassContext


class ReparamConfig(PassConfig):
    samples: int = Field(8, ge=1, le=1000, description="inputs the deploy form is compared on (half real samples where the recipe has data, half random)")
    rtol: float = Field(1e-5, gt=0, description="largest difference allowed, relative to each output's largest magnitude")


class Reparam(Pass):
    """Deploy-time re-parameterisation (branch merging, BN folding), checked for parity."""

    name = "reparam"
    kind = "compress"
    Config = ReparamConfig
    accepts = ("torch",)

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        import torch

        from edgekit.models.reparam import count_reparameterizable, deploy

        cfg: ReparamConfig = self.config
        source = copy.deepcopy(artifact.torch_module()).eval()
        rewritable = count_reparameterizable(source)
        if rewritable == 0:
            raise UserError(f"{ctx.path or 'reparam'}: this model has nothing to re-parameterize (no module with reparameterize() and no Conv followed by "
                            "BatchNorm); remove the step")
        deployed = deploy(source)
        feeds = _feeds(artifact, ctx, cfg.samples)
        worst = 0.0
        with torch.no_grad():
            for feed in feeds:
                args = [torch.from_numpy(np.ascontiguousarray(feed[s.name])) for s in artifact.inputs]
                for ref, got in zip(_tensors(source(*args)), _tensors(deployed(*args))):
                    scale = float(ref.abs().max()) + 1e-12
                    worst = max(worst, float((got - ref).abs().max()) / scale)
        before, after = _count(source), _count(deployed)
        ctx.metrics["reparam"] = {"rewritten": rewritable, "params_before": before, "params_after": after, "max_rel_diff": worst, "samples": len(feeds)}
        ctx.log(f"  re-parameterized {rewritable} modules: {before:,} -> {after:,} params, largest difference {worst:.2e} of output scale")
        if not worst <= cfg.rtol:
            raise StepFailed(f"the deploy form differs from the trained model by {worst:.2e} of the output scale (allowed {cfg.rtol:g}); "
                             "a reparameterize() method is wrong, or the model has train-time behaviour that eval() does not switch off")
        builder = copy.deepcopy(artifact.builder) if artifact.builder else None
        if builder is not None:  # a saved step rebuilds the deploy architecture before loading its weights
            builder["transforms"] = list(builder.get("transforms", [])) + [{"kind": "reparam", "args": {}}]
        return artifact.derive(module=deployed, builder=builder)


def _feeds(artifact: Artifact, ctx: PassContext, n: int) -> list[dict[str, np.ndarray]]:
    real = ctx.samples((n + 1) // 2) if ctx.samples else []
    random = [{s.name: s.random(ctx.dims, seed=1000 + i) for s in artifact.inputs} for i in range(n - len(real))]
    return list(real) + random


def _tensors(out) -> list:
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return [out]


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())
