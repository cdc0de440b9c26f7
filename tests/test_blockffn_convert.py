"""Dense FFN -> BlockFFN conversion, and the train.lm / moe.blockffn passes on tiny_lm_micro."""

import copy

import numpy as np
import pydantic
import pytest
import torch

from edgekit.artifact import Artifact
from edgekit.compress.moe.convert import balanced_kmeans, convert_ffn, convert_model, expert_count, to_blockffn
from edgekit.compress.moe.finetune import BlockFFNConfig, MoEBlockFFN, adapt_lambda
from edgekit.compress.moe.train_lm import TrainLM, TrainLMConfig
from edgekit.data import Split
from edgekit.errors import UserError
from edgekit.models import byte_text
from edgekit.models.blockffn import BlockFFN, DenseFFN, record_routing
from edgekit.models.registry import model_info
from edgekit.models.tiny_lm import tiny_lm_micro
from edgekit.passes import PassContext

SEQ = 64


class FakeData:
    """What the passes read from RecipeData: named splits of byte windows."""

    def __init__(self, splits: dict[str, np.ndarray]):
        self.splits = {k: Split(k, {"input_ids": v}) for k, v in splits.items()}

    def has_split(self, name):
        return name in self.splits

    def split(self, name):
        return self.splits[name]


@pytest.fixture(scope="module")
def corpus():
    from pathlib import Path

    ids = byte_text.text_windows(Path(__file__).resolve().parent.parent / "examples/data/python_docs_sentences.txt", SEQ)
    order = np.random.default_rng(0).permutation(len(ids))
    return FakeData({"train": ids[order[:2000]], "eval": ids[order[-48:]]})


def micro_artifact(**args) -> Artifact:
    torch.manual_seed(0)
    info = model_info("tiny_lm_micro")
    return Artifact(format="torch", inputs=info.inputs, task=info.task, builder={"kind": "zoo", "name": "tiny_lm_micro", "args": args}, module=tiny_lm_micro(**args).eval())


def make_ctx(tmp_path, data, key="k1") -> PassContext:
    return PassContext(workdir=tmp_path / "work", data=data, cache_dir=tmp_path / "cache", key=key, seed=0, log=lambda m: None)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """tiny_lm_micro after a short train.lm run (shared by the tests below)."""
    tmp = tmp_path_factory.mktemp("trained")
    ctx = make_ctx(tmp, corpus)
    out = TrainLM(TrainLMConfig(steps=80, batch_size=16, lr=3e-3, eval_samples=48)).run(micro_artifact(), ctx)
    return out, ctx.metrics["train"]


# -- clustering and conversion --------------------------------------------------------------

def test_balanced_kmeans_equal_sizes_and_planted_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=gen) * 5
    truth = torch.arange(32) % 4
    x = centres[truth] + 0.1 * torch.randn(32, 16, generator=gen)
    labels = balanced_kmeans(x, 4, seed=1)
    assert torch.bincount(labels, minlength=4).tolist() == [8, 8, 8, 8]
    for c in range(4):  # each planted cluster lands in one label
        assert len(set(labels[truth == c].tolist())) == 1
    with pytest.raises(ValueError):
        balanced_kmeans(x, 5)


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu"])
def test_convert_ffn_is_exact_and_a_permutation(activation):
    torch.manual_seed(0)
    dense = DenseFFN(24, 48, activation)
    block, order = convert_ffn(dense, 6)
    assert sorted(order.tolist()) == list(range(48))
    assert block.up.shape == block.down.shape == (6, 8, 24)
    torch.testing.assert_close(block.up.reshape(48, 24), dense.fc1.weight[order])
    x = torch.randn(5, 24)
    with torch.no_grad():
        _, scores = block.route(x)
        torch.testing.assert_close(scores, torch.ones_like(scores), rtol=0, atol=1e-7)
        torch.testing.assert_close(block(x), dense(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cluster", ["coactivation", "weights"])
def test_converted_model_reproduces_dense_logits(trained, corpus, cluster):
    dense = trained[0].torch_module()
    model = copy.deepcopy(dense)
    calib = torch.from_numpy(corpus.split("train").arrays["input_ids"][:16])
    layers = convert_model(model, experts=8, calibration_ids=calib, cluster=cluster)
    assert [c.name for c in layers] == ["blocks.0.ffn", "blocks.1.ffn"] and layers[0].expert_size == 32
    assert not any(isinstance(m, DenseFFN) for m in model.modules())
    x = torch.from_numpy(corpus.split("eval").arrays["input_ids"][:4])
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-5)


def test_to_blockffn_rebuilds_the_converted_shape():
    model = tiny_lm_micro().eval()
    converted = copy.deepcopy(model)
    convert_model(converted, expert_size=64, cluster="weights")
    rebuilt = to_blockffn(tiny_lm_micro(), expert_size=64)
    rebuilt.load_state_dict(converted.state_dict())
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), converted(x))
    with pytest.raises(UserError, match="no DenseFFN"):
        to_blockffn(rebuilt, experts=4)


def test_conversion_errors_name_the_fix():
    with pytest.raises(UserError, match="dividing 256"):
        expert_count(256, 7, None)
    with pytest.raises(UserError, match="must equal"):
        expert_count(256, 8, 16)
    assert expert_count(256, None, 32) == 8
    with pytest.raises(UserError, match=r"DenseFFN.*already has BlockFFN"):
        convert_model(tiny_lm_micro(experts=4))
    with pytest.raises(UserError, match="calibration"):
        convert_model(tiny_lm_micro(), experts=4)
    with pytest.raises(pydantic.ValidationError, match="not both"):
        BlockFFNConfig(experts=4, expert_size=64)
    with pytest.raises(pydantic.ValidationError):
        BlockFFNConfig(expert=4)  # a typo is an error, not a default


def test_adapt_lambda_moves_toward_the_target():
    assert adapt_lambda(1.0, 0.5, 0.9, 1.0) > 1.0  # below target
    assert adapt_lambda(1.0, 0.95, 0.9, 1.0) < 1.0  # overshoot
    assert adapt_lambda(1.0, 0.91, 0.9, 1.0) == 1.0  # within the margin
    assert adapt_lambda(0.0101, 0.99, 0.9, 1.0) == pytest.approx(0.01)  # floor


# -- passes --------------------------------------------------------------------------------

def test_train_lm_learns_and_caches(trained, corpus, tmp_path):
    _, metrics = trained
    assert metrics["cached"] is False and metrics["final_loss"] < metrics["first_loss"]
    assert metrics["eval"]["ppl"] < metrics["eval_before"]["ppl"] < 300
    # same key, fresh cache dir: trains; then the rerun loads the weights
    ctx = make_ctx(tmp_path, corpus)
    cfg = TrainLMConfig(steps=3, batch_size=4, eval_samples=0)
    first = TrainLM(cfg).run(micro_artifact(), ctx)
    again = make_ctx(tmp_path, corpus)
    second = TrainLM(cfg).run(micro_artifact(), again)
    assert again.metrics["train"]["cached"] is True
    for a, b in zip(first.torch_module().state_dict().values(), second.torch_module().state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_moe_blockffn_finetune_raises_sparsity(trained, corpus, tmp_path):
    source, _ = trained
    ctx = make_ctx(tmp_path, corpus)
    cfg = BlockFFNConfig(experts=8, steps=40, batch_size=16, calibration_samples=16, eval_samples=48)
    out = MoEBlockFFN(cfg).run(source, ctx)
    m = ctx.metrics["blockffn"]
    assert m["experts"] == 8 and m["expert_size"] == 32 and m["layers"] == 2
    assert m["before"]["ppl"] == pytest.approx(m["dense"]["ppl"], rel=1e-4)  # the conversion alone changes nothing
    assert m["before"]["tls"] == 0.0 and m["before"]["cls_8"] == 0.0
    after = m["after"]
    assert after["tls"] > 0.3 and after["cls_8"] > 0.1 and set(after["per_layer_tls"]) == {"blocks.0.ffn", "blocks.1.ffn"}
    assert after["ppl"] < 1.5 * m["dense"]["ppl"]
    assert 0 <= after["zero_active_tokens"] <= 1
    assert out.builder["transforms"] == [{"kind": "blockffn", "args": {"experts": 8}}]
    # the builder rebuilds the converted model from the zoo source
    rebuilt = to_blockffn(tiny_lm_micro(), **out.builder["transforms"][0]["args"])
    rebuilt.load_state_dict(out.torch_module().state_dict())
    x = torch.from_numpy(corpus.split("eval").arrays["input_ids"][:2])
    with torch.no_grad(), record_routing(rebuilt, detach=True) as rec:
        torch.testing.assert_close(rebuilt.eval()(x), out.torch_module()(x))
    assert all(isinstance(m, BlockFFN) for m in [rebuilt.blocks[0].ffn, rebuilt.blocks[1].ffn]) and rec["blocks.0.ffn"]
    # a rerun with the same key reuses the fine-tuned weights
    again = make_ctx(tmp_path, corpus)
    MoEBlockFFN(cfg).run(source, again)
    assert again.metrics["blockffn"]["cached"] is True
    assert again.metrics["blockffn"]["after"]["tls"] == after["tls"]


def test_passes_reject_bad_inputs(trained, corpus, tmp_path):
    source, _ = trained
    with pytest.raises(UserError, match="data:"):
        MoEBlockFFN(BlockFFNConfig(steps=1)).run(source, make_ctx(tmp_path, None))
    no_ids = FakeData({})
    no_ids.splits["train"] = Split("train", {"input": np.zeros((4, 8), np.float32)})
    with pytest.raises(UserError, match="no input_ids"):
        TrainLM(TrainLMConfig(steps=1)).run(micro_artifact(), make_ctx(tmp_path, no_ids))
    with pytest.raises(UserError, match="dividing 256"):
        MoEBlockFFN(BlockFFNConfig(experts=7, steps=1, eval_samples=0)).run(source, make_ctx(tmp_path, corpus))
    with pytest.raises(UserError, match="DenseFFN"):
        MoEBlockFFN(BlockFFNConfig(steps=1)).run(micro_artifact(experts=4), make_ctx(tmp_path, corpus))
    quantized = source.derive(builder={**source.builder, "transforms": [{"kind": "quantize"}]})
    with pytest.raises(UserError, match="before other model changes"):
        MoEBlockFFN(BlockFFNConfig(steps=1)).run(quantized, make_ctx(tmp_path, corpus))
    digits = Artifact(format="torch", inputs=source.inputs, task="classification", module=torch.nn.Sequential(torch.nn.Embedding(256, 4), torch.nn.Flatten(), torch.nn.LazyLinear(3)))
    with pytest.raises(UserError, match="causal LM"):
        TrainLM(TrainLMConfig(steps=1)).run(digits, make_ctx(tmp_path, corpus))
    big = FakeData({"train": np.full((4, 8), 300, np.int64)})
    with pytest.raises(UserError, match="vocabulary of 256"):
        TrainLM(TrainLMConfig(steps=1)).run(micro_artifact(), make_ctx(tmp_path, big))
