"""The literature zoo, every variant alike: profile, deploy parity, exports with parity, and a short training that learns.

Each family's own arithmetic (dilated kernels, shift-and-multiply aggregation, FFT
convolutions, fused kernels, hyper-kernels) is tested in its own file; this file
holds every registered variant to the same contract.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgekit.artifact import Artifact
from edgekit.models import create_model, list_models, model_info
from edgekit.models.reparam import deploy
from edgekit.passes import PassContext
from tests.conftest import randomize_norms

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = ("unireplknet", "lsnet", "hornet", "ffnet", "sgconv", "convfirst", "terminator")
VARIANTS = [n for n in list_models() if n.split("_")[0] in FAMILIES]
TINY = [f"{f}_tiny" for f in FAMILIES if f"{f}_tiny" in VARIANTS]




def artifact(name: str, module: nn.Module) -> Artifact:
    info = model_info(name)
    return Artifact(format="torch", inputs=info.inputs, task=info.task, outputs=["logits"], module=module.eval())


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_every_family_registers_tiny_and_small():
    for family in FAMILIES:
        assert {f"{family}_tiny", f"{family}_small"} <= set(VARIANTS), family
        info = model_info(f"{family}_tiny")
        assert info.task == "classification" and info.inputs[0].shape == ["batch", 3, 32, 32] and info.description


@pytest.mark.parametrize("name", VARIANTS)
def test_profile_and_class_count(name):
    from edgekit.profile import profile_artifact

    torch.manual_seed(0)
    model = create_model(name)
    assert model.eval()(images(2)).shape == (2, 10)
    assert create_model(name, num_classes=4).eval()(images(2)).shape == (2, 4)
    info = profile_artifact(artifact(name, model), {"batch": 1})
    assert info["params"] == sum(p.numel() for p in model.parameters()) > 10_000
    assert info["macs"] and info["macs"] > info["params"] / 2  # convolutions reuse each weight across positions


@pytest.mark.parametrize("name", VARIANTS)
def test_deploy_form_equals_training_form(name):
    torch.manual_seed(0)
    model = randomize_norms(create_model(name))
    deployed = deploy(model)
    x = images(4, seed=1)
    with torch.no_grad():
        ref, got = model(x), deployed(x)
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in deployed.modules()), "BatchNorm left after deploy"
    assert len(deployed.state_dict()) < len(model.state_dict())  # fewer stored tensors (the weight count may grow: generated kernels)
    assert deploy(deployed) is not deployed  # deploying again is harmless
    with torch.no_grad():
        torch.testing.assert_close(deploy(deployed)(x), got, rtol=0, atol=1e-6 * float(ref.abs().max()))


def test_reparam_pass_records_the_change(tmp_path):
    from edgekit.compress.reparam import Reparam, ReparamConfig

    model = randomize_norms(create_model(TINY[0]))
    ctx = PassContext(workdir=tmp_path, dims={"batch": 1}, log=lambda _m: None)
    out = Reparam(ReparamConfig()).run(artifact(TINY[0], model), ctx)
    rec = ctx.metrics["reparam"]
    assert rec["rewritten"] > 0 and rec["params_after"] != rec["params_before"] and rec["max_rel_diff"] <= 1e-5
    assert out.module is not model and not any(isinstance(m, nn.BatchNorm2d) for m in out.module.modules())


def _export(kind: str, source: Artifact, tmp_path, tag: str) -> dict:
    from edgekit.passes import get_pass

    cls = get_pass(f"export.{kind}")
    workdir = tmp_path / f"{kind}-{tag}"
    workdir.mkdir()
    ctx = PassContext(workdir=workdir, dims={"batch": 1}, log=lambda _m: None, run_dir=tmp_path / "run")
    cls(cls.Config()).run(source, ctx)
    return ctx.metrics["verify"]


@pytest.mark.parametrize("name", VARIANTS)
def test_both_forms_export_to_onnx_with_parity(name, tmp_path):
    torch.manual_seed(0)
    model = randomize_norms(create_model(name))
    for tag, module in (("train", model), ("deploy", deploy(model))):
        verify = _export("onnx", artifact(name, module), tmp_path, tag)
        assert verify["passed"] and verify["max_abs"] < 1e-4, (tag, verify)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tflite", "tvm"])
@pytest.mark.parametrize("name", TINY)
def test_deploy_form_exports_to_tflite_and_tvm_with_parity(name, kind, tmp_path):
    pytest.importorskip({"tflite": "litert_torch", "tvm": "tvm"}[kind])
    torch.manual_seed(0)
    verify = _export(kind, artifact(name, deploy(randomize_norms(create_model(name)))), tmp_path, "deploy")
    assert verify["passed"] and verify["max_abs"] < 1e-4, verify


@pytest.fixture(scope="module")
def digits():
    """Real handwritten digits on 32x32 noisy canvases, 1500 images."""
    from edgekit.models.datasets import generate
    from edgekit.models.registry import image_inputs

    data = generate("digits_canvas", 1500, 0, image_inputs(32), {"batch": 1})
    return torch.from_numpy(data.arrays["image"]), torch.from_numpy(data.labels)


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
def test_family_learns_digits(name, digits):
    """Five epochs: the loss falls and the model, in eval mode and in both forms, fits far above chance (1/10).

    This shows every family trains (gradients reach every operator, eval-mode statistics are sound);
    it does not measure generalisation: at this budget HorNet, UniRepLKNet and LSNet still
    memorise rather than generalise to unseen glyphs. bench/zoo.py trains longer and reports
    accuracy on held-out glyphs.
    """
    x, y = digits
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).train()
    epochs, batch = 5, 50
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * (len(y) // batch))
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch))
        total = 0.0
        for i in range(0, len(y) - batch + 1, batch):
            idx = order[i : i + batch]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        losses.append(total / (len(y) // batch))
    model.eval()
    with torch.no_grad():
        seen = x[:500], y[:500]
        accuracy = float((model(seen[0]).argmax(1) == seen[1]).float().mean())
        deployed_accuracy = float((deploy(model)(seen[0]).argmax(1) == seen[1]).float().mean())
    assert np.isfinite(losses).all() and losses[-1] < 0.75 * losses[0], losses
    assert accuracy >= 0.4, accuracy
    assert deployed_accuracy == pytest.approx(accuracy, abs=1 / 500)


@pytest.mark.slow
def test_recipe_trains_reparameterizes_and_exports_both_forms(tmp_path):
    """zoo: source -> train.supervised -> reparam -> ONNX of both forms; the saved deploy step reloads as the deploy form."""
    import json

    from edgekit.artifact import Artifact as SavedArtifact
    from tests.conftest import compress_recipe

    run = compress_recipe(tmp_path, f"""
name: zoo-reparam
model: {{source: "zoo:{TINY[0]}", args: {{num_classes: 10}}, dims: {{batch: 1}}}}
data:
  source: synth:digits_canvas:200
  holdout: 0.25
  calibration: {{samples: 4}}
  eval: {{metric: top1}}
compress:
  - train.supervised: {{epochs: 1, batch_size: 50}}
  - reparam: {{}}
export:
  - onnx: {{opset: 17}}
    of: train.supervised
  - onnx: {{opset: 17}}
report: {{formats: [json]}}
""")
    report = json.loads((run / "report.json").read_text())
    by_pass = {s["pass"]: s for s in report["steps"]}
    rec = by_pass["reparam"]["metrics"]["reparam"]
    assert rec["params_after"] != rec["params_before"] and rec["max_rel_diff"] <= 1e-5
    exports = [s for s in report["steps"] if s["pass"] == "export.onnx"]
    assert len(exports) == 2 and all(s["metrics"]["verify"]["passed"] for s in exports)
    saved = SavedArtifact.load(next((run / "steps").glob("*reparam")) / "artifact")
    trained = SavedArtifact.load(next((run / "steps").glob("*train.supervised")) / "artifact")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in saved.torch_module().modules())
    x = images(3, seed=5)
    with torch.no_grad():
        ref = trained.torch_module()(x)
        torch.testing.assert_close(saved.torch_module()(x), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
