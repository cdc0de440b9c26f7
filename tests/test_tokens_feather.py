"""tokens.feather: FastV / FEATHER schedules on the tiny VLM, position ids, ONNX export, and the RoPE bias."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from edgekit.artifact import Artifact
from edgekit.compress.tokens.feather import FeatherConfig, TokensFeather, apply_feather, kept_positions, plan_stages
from edgekit.errors import UserError
from edgekit.models import create_model, model_info
from edgekit.models.datasets import generate
from edgekit.passes import PassContext


def _artifact(name: str, module) -> Artifact:
    info = model_info(name)
    return Artifact(
        format="torch", inputs=info.inputs, task=info.task, builder={"kind": "zoo", "name": name, "args": {}}, module=module, meta={"dims": dict(info.dims)}
    )


def _feeds(name: str, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    info = model_info(name)
    return generate("shapes_vqa", n, seed, info.inputs, info.dims).arrays


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return create_model("tiny_vlm_micro").eval()


@pytest.mark.parametrize("method", ["fastv", "fastv_norope", "feather"])
def test_token_counts_follow_the_schedule(micro, method, tmp_path):
    ctx = PassContext(workdir=tmp_path, dims=model_info("tiny_vlm_micro").dims)
    out = TokensFeather(FeatherConfig(method=method)).run(_artifact("tiny_vlm_micro", micro), ctx)
    tokens = ctx.metrics["tokens"]
    assert out.meta["tokens"] == tokens
    text = 8
    stages = {s["layer"]: s["keep"] for s in tokens["stages"]}
    expected, image = [], micro.num_image_tokens
    for layer in range(len(micro.blocks)):
        image = stages.get(layer, image)
        expected.append(image + text)  # text tokens are never pruned
    assert [row["tokens"] for row in tokens["layers"]] == expected
    assert [row["dense_tokens"] for row in tokens["layers"]] == [micro.num_image_tokens + text] * len(micro.blocks)
    assert all(r["macs"] < r["dense_macs"] for r in tokens["layers"] if r["tokens"] < r["dense_tokens"])
    if method == "feather":  # 30% of 64 by score + the 3 x 3 grid, then a quarter of those
        assert tokens["stages"] == [
            {"layer": 1, "keep": 28, "rope": False, "grid_stride": 3},
            {"layer": 2, "keep": 7, "rope": False, "grid_stride": 0},
        ]
    else:  # equal compute: blocks 1..3 read 14 image tokens each = 28 + 7 + 7
        assert tokens["stages"] == [{"layer": 1, "keep": 14, "rope": method == "fastv", "grid_stride": 0}]


def test_feather_keeps_the_grid_and_text_and_position_ids(micro):
    pruned = apply_feather(copy.deepcopy(micro), method="feather")
    feeds = _feeds("tiny_vlm_micro", 4)
    kept = kept_positions(pruned, feeds)
    first, second = kept[1], kept[2]
    grid = {r * 8 + c for r in (0, 3, 6) for c in (0, 3, 6)}
    for row in first.tolist():
        assert grid <= set(row) and row == sorted(row) and len(set(row)) == 28
    for a, b in zip(first.tolist(), second.tolist()):
        assert set(b) <= set(a)  # stage 2 picks among the survivors


def _reference(model, feeds, kept: dict[int, torch.Tensor]) -> torch.Tensor:
    """The unpruned model's blocks run by hand: after block L-1, keep the given image tokens, their position ids and all text."""
    pixels, ids = torch.as_tensor(feeds["pixel_values"]), torch.as_tensor(feeds["input_ids"])
    out = []
    for b in range(len(ids)):
        h = torch.cat([model.encode_image(pixels[b : b + 1]), model.embed(ids[b : b + 1])], dim=1)
        n_img, t = model.num_image_tokens, h.shape[1]
        pos = torch.arange(t).unsqueeze(0)
        for i, block in enumerate(model.blocks):
            h = block(h, pos)
            if i + 1 in kept:
                keep = kept[i + 1][b].tolist()  # original grid indices = position ids of image tokens
                rows = keep + list(range(model.num_image_tokens, t))
                where = [pos[0].tolist().index(p) for p in rows]
                h, pos = h[:, where], torch.tensor([rows])
                n_img = len(keep)
        assert n_img == len(keep)
        out.append(model.head(model.norm(h[:, -1])))
    return torch.cat(out)


@pytest.mark.parametrize("method", ["fastv", "feather"])
def test_pruned_model_equals_reference_on_kept_tokens(micro, method):
    pruned = apply_feather(copy.deepcopy(micro), method=method)
    feeds = _feeds("tiny_vlm_micro", 3, seed=1)
    kept = kept_positions(pruned, feeds)
    with torch.no_grad():
        got = pruned(torch.as_tensor(feeds["pixel_values"]), torch.as_tensor(feeds["input_ids"]))
        want = _reference(micro, feeds, kept)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rebuild_from_builder_gives_the_same_model(micro, tmp_path):
    from edgekit import sources

    ctx = PassContext(workdir=tmp_path, dims=model_info("tiny_vlm_micro").dims)
    out = TokensFeather(FeatherConfig(method="feather")).run(_artifact("tiny_vlm_micro", micro), ctx)
    rebuilt = sources.build_torch_module(out.builder)
    rebuilt.load_state_dict(out.module.state_dict())
    feeds = {k: torch.as_tensor(v) for k, v in _feeds("tiny_vlm_micro", 2).items()}
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(**feeds), out.module(**feeds))


def test_pruned_vlm_exports_to_onnx_and_matches_torch(micro, tmp_path):
    from edgekit.export.onnx import ExportOnnx, OnnxConfig

    dims = model_info("tiny_vlm_micro").dims
    ctx = PassContext(workdir=tmp_path / "prune", dims=dims)
    pruned = TokensFeather(FeatherConfig(method="feather")).run(_artifact("tiny_vlm_micro", micro), ctx)
    (tmp_path / "onnx").mkdir()
    ectx = PassContext(workdir=tmp_path / "onnx", dims=dims)
    onnx_art = ExportOnnx(OnnxConfig()).run(pruned, ectx)
    assert ectx.metrics["verify"]["passed"]

    import onnxruntime as ort

    feeds = _feeds("tiny_vlm_micro", 5, seed=2)
    session = ort.InferenceSession(str(onnx_art.path()), providers=["CPUExecutionProvider"])
    got = session.run(None, feeds)[0]
    with torch.no_grad():
        want = pruned.module(**{k: torch.as_tensor(v) for k, v in feeds.items()}).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_errors_name_the_problem(micro, tmp_path):
    ctx = PassContext(workdir=tmp_path)
    with pytest.raises(UserError, match="does not expose"):
        TokensFeather(FeatherConfig()).run(_artifact("tiny_vlm_micro", torch.nn.Linear(2, 2)), ctx)
    with pytest.raises(UserError, match="stage2"):
        plan_stages(micro, FeatherConfig(stage1=0.5, stage2=0.25))
    with pytest.raises(UserError, match="already prunes"):
        apply_feather(apply_feather(copy.deepcopy(micro), method="fastv"), method="fastv")


# -- the positional bias, on a trained VLM ------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """tiny_vlm_micro trained briefly by train.supervised on shapes_vqa (about a minute on one core)."""
    from edgekit.compress.train import TrainConfig, TrainSupervised
    from edgekit.data import Split

    folder = tmp_path_factory.mktemp("vlm")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEKIT_CACHE", str(folder / "cache"))
        info = model_info("tiny_vlm_micro")
        data = generate("shapes_vqa", 3000, 0, info.inputs, info.dims)

        class Data:
            def split(self, name):
                return Split(name, data.arrays, data.labels)

        torch.manual_seed(0)
        module = create_model("tiny_vlm_micro").eval()
        ctx = PassContext(workdir=folder, data=Data(), seed=0)
        out = TrainSupervised(TrainConfig(epochs=4, batch_size=32)).run(_artifact("tiny_vlm_micro", module), ctx)
    return out.module.eval()


def _mean_rows(module, feeds) -> dict[int, float]:
    cols = module.image_grid[1]
    return {layer: float((k // cols).float().mean()) for layer, k in kept_positions(module, feeds).items()}


@pytest.mark.slow
def test_rope_criterion_is_positionally_biased_and_feather_covers_the_image(trained):
    """What the trained micro VLM shows (measured, see bench/tokens_vlm.py for the full model):

    the FastV criterion (attention of the last query, with RoPE) concentrates on one band of rows — in this
    model trained from scratch it is the *top* rows (far from the query), the opposite sign of a pretrained
    LLaMA's recency — while the same score without RoPE is less concentrated and FEATHER's grid keeps
    tokens from every third row, top and bottom, in every sample."""
    feeds = _feeds("tiny_vlm_micro", 200, seed=3)
    rows = trained.image_grid[0]
    middle = (rows - 1) / 2
    fastv = _mean_rows(apply_feather(copy.deepcopy(trained), method="fastv"), feeds)[1]
    norope = _mean_rows(apply_feather(copy.deepcopy(trained), method="fastv_norope"), feeds)[1]
    assert abs(fastv - middle) > 0.8  # RoPE: a strong positional preference
    assert abs(fastv - middle) > abs(norope - middle) + 0.2  # without RoPE: less of it
    feather = apply_feather(copy.deepcopy(trained), method="feather")
    first = kept_positions(feather, feeds)[1] // trained.image_grid[1]
    for sample in first.tolist():
        assert {0, 3, 6} <= set(sample)  # the uniform grid: top, middle and bottom rows survive stage 1
    top_share = float((first < rows // 2).float().mean())
    assert 0.3 < top_share < 0.8
