"""Encoder-decoder distillation: the models, the KD loss, the training loop and the passes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.conftest import compress_recipe, run_cli, scrambled_weights, write_recipe
from edgekit.compress.distill.kd import kd_loss
from edgekit.compress.distill.loop import fit
from edgekit.compress.distill.pairs import Pairs, decoder_only_batch, target_logits
from edgekit.errors import UserError
from edgekit.models.encdec import (
    EncoderDecoderLM,
    LMConfig,
    count_params,
    generate,
    init_student_from_teacher,
    student_config,
)
from edgekit.models.event_log import EVENTS, MARGIN, VOCAB_SIZE, decode, event_log, event_log_teacher, event_log_teacher_micro


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pairs(n: int, seq: int = 64, seed: int = 0) -> Pairs:
    d = event_log(n, seed, [], {"seq": seq})
    return Pairs(*(torch.from_numpy(d.arrays[k]) for k in ("input_ids", "attention_mask", "target_ids")))


def _student(teacher) -> EncoderDecoderLM:
    torch.manual_seed(1)
    return EncoderDecoderLM(student_config(teacher.cfg))


# -- the KD loss ---------------------------------------------------------------


def test_kd_loss_equals_a_hand_computed_value():
    # one sequence of two target tokens, vocabulary 3; the second token is padding
    s = torch.tensor([[[1.0, 0.0, -1.0], [5.0, 5.0, 5.0]]])
    t = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 9.0]]])
    target = torch.tensor([[1, 0]])  # PAD = 0 masks the second position
    temperature, alpha = 2.0, 0.9

    def softmax(v):
        e = [math.exp(x) for x in v]
        return [x / sum(e) for x in e]

    ps = softmax([1.0 / 2, 0.0, -1.0 / 2])
    pt = softmax([0.0, 1.0 / 2, 0.0])
    kl = sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps)) * temperature**2
    ce = -math.log(softmax([1.0, 0.0, -1.0])[1])
    loss, parts = kd_loss(s, t, target, pad=0, alpha=alpha, temperature=temperature)
    assert parts["kl"] == pytest.approx(kl, rel=1e-5)
    assert parts["ce"] == pytest.approx(ce, rel=1e-5)
    assert float(loss) == pytest.approx(alpha * kl + (1 - alpha) * ce, rel=1e-5)


def test_kd_loss_is_zero_kl_when_student_equals_teacher():
    logits = torch.randn(2, 4, 7)
    target = torch.randint(1, 7, (2, 4))
    _, parts = kd_loss(logits, logits.clone(), target, pad=0)
    assert parts["kl"] == pytest.approx(0.0, abs=1e-6)


# -- the models ----------------------------------------------------------------


def test_student_runs_its_encoder_once_per_input():
    student = scrambled_weights(_student(event_log_teacher_micro()), 0)
    pairs = _pairs(3)
    out = generate(student, pairs.source, 8, pairs.source_mask, stop_at_eos=False)
    assert out.shape == (3, 8)
    assert student.encoder_calls == 1


@pytest.mark.parametrize("kind", ["decoder", "encdec"])
def test_cached_generation_equals_uncached(kind):
    teacher = scrambled_weights(event_log_teacher_micro(), 3)
    model = teacher if kind == "decoder" else scrambled_weights(_student(teacher), 4)
    pairs = _pairs(4, seed=5)
    for temperature in (0.0, 0.8):
        if kind == "decoder":
            for i in range(len(pairs)):
                ids = pairs.source[i : i + 1, : int(pairs.source_mask[i].sum())]
                a = generate(model, ids, 10, temperature=temperature, seed=7, stop_at_eos=False)
                b = generate(model, ids, 10, temperature=temperature, seed=7, stop_at_eos=False, use_cache=False)
                assert torch.equal(a, b)
        else:
            a = generate(model, pairs.source, 10, pairs.source_mask, temperature=temperature, seed=7, stop_at_eos=False)
            b = generate(model, pairs.source, 10, pairs.source_mask, temperature=temperature, seed=7, stop_at_eos=False, use_cache=False)
            assert torch.equal(a, b)
    assert len(set(a.flatten().tolist())) > 2  # the weights are spread enough that tokens vary


def test_encoder_output_ignores_padding_and_centres_positions():
    student = scrambled_weights(_student(event_log_teacher_micro()), 0)
    pairs = _pairs(1)
    n = int(pairs.source_mask[0].sum())
    ids = pairs.source[:, :n]
    padded = torch.cat([ids, torch.zeros(1, 9, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, n, dtype=torch.long), torch.zeros(1, 9, dtype=torch.long)], dim=1)
    with torch.no_grad():
        plain = student.encode(ids)
        with_pad = student.encode(padded, mask)
    torch.testing.assert_close(with_pad[:, :n], plain, atol=1e-5, rtol=1e-5)


def test_student_matches_teacher_parameters_and_starts_from_it():
    teacher = event_log_teacher()
    cfg = student_config(teacher.cfg)
    assert (cfg.enc_layers, cfg.dec_layers) == (4, 2)  # 2/3 of 6 layers in the encoder
    student = EncoderDecoderLM(cfg)
    assert 0.97 * count_params(teacher) <= count_params(student) <= count_params(teacher)
    init_student_from_teacher(student, teacher)
    assert torch.equal(student.embed_tokens.weight, teacher.embed_tokens.weight)
    assert torch.equal(student.encoder[0].self_attn.q_proj.weight, teacher.layers[0].self_attn.q_proj.weight)
    assert torch.equal(student.decoder[-1].self_attn.k_proj.weight, teacher.layers[-1].self_attn.k_proj.weight)


def test_student_config_refuses_a_size_it_cannot_match():
    tiny = LMConfig(vocab=10, dim=16, heads=2, kv_heads=2, ffn=8, layers=2)
    with pytest.raises(UserError, match="cannot match"):
        student_config(tiny, enc_layers=1, dec_layers=3)


def test_teacher_logits_line_up_with_the_target_tokens():
    teacher = scrambled_weights(event_log_teacher_micro(), 0)
    pairs = _pairs(3)
    seq, where = decoder_only_batch(pairs, pad=0)
    with torch.no_grad():
        full = teacher(seq)
        aligned = target_logits(teacher, pairs)
        # row 0 alone, unpadded: the logit at the last source position predicts the first target token
        n = int(pairs.source_mask[0].sum())
        alone = teacher(torch.cat([pairs.source[0, :n], pairs.target[0]]).unsqueeze(0))
    assert torch.equal(seq[0, n : n + pairs.target.shape[1]], pairs.target[0])
    torch.testing.assert_close(aligned[0], alone[0, n - 1 : n - 1 + pairs.target.shape[1]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aligned, full.gather(1, where.unsqueeze(-1).expand(-1, -1, full.shape[-1])))


def test_event_log_answers_are_the_most_frequent_events():
    d = event_log(50, 3, [], {"seq": 96})
    assert d.arrays["input_ids"].shape == (50, 96) and d.arrays["target_ids"].shape == (50, 4)
    for src, tgt in zip(d.arrays["input_ids"], d.arrays["target_ids"]):
        words, answer = decode(src).split(), decode(tgt).split()
        counts = sorted(((words.count(e), e) for e in EVENTS), reverse=True)
        assert answer == [e for _, e in counts[:3]]
        assert all(counts[i][0] - counts[i + 1][0] >= MARGIN for i in range(3))  # never a tie
        assert 32 <= len(words) <= 94
    assert d.arrays["input_ids"].max() < VOCAB_SIZE


def test_teacher_targets_are_its_greedy_answers():
    from edgekit.compress.distill.pairs import teacher_targets

    teacher = scrambled_weights(event_log_teacher_micro(), 2)
    pairs = _pairs(7, seed=4)
    produced = teacher_targets(teacher, pairs, batch_size=2)
    assert produced.shape == pairs.target.shape
    for i in range(len(pairs)):
        n = int(pairs.source_mask[i].sum())
        alone = generate(teacher, pairs.source[i : i + 1, :n], pairs.target.shape[1])[0]
        assert torch.equal(produced[i, : len(alone)], alone)
        assert bool((produced[i, len(alone) :] == 0).all())


# -- the training loop -----------------------------------------------------------


def test_a_killed_run_resumes_from_its_checkpoint(tmp_path):
    pairs = _pairs(40)

    def train(checkpoint, fail_at=None):
        torch.manual_seed(0)
        model = event_log_teacher_micro()
        calls = {"n": 0}

        def loss_fn(batch):
            calls["n"] += 1
            if fail_at is not None and calls["n"] == fail_at:
                raise KeyboardInterrupt
            logits = target_logits(model, batch)
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.target.reshape(-1), ignore_index=0), {}

        log = fit(model, pairs, loss_fn, steps=6, batch_size=8, lr=1e-2, weight_decay=0.0, seed=0, checkpoint=checkpoint, checkpoint_every=2)
        return model, log

    whole, _ = train(None)
    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        train(ckpt, fail_at=5)  # dies in step 5, after the checkpoint at step 4
    assert ckpt.is_file()
    resumed, log = train(ckpt)
    assert log.resumed_from == 4
    assert not ckpt.exists()  # a finished run removes its checkpoint
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)


# -- Hugging Face teachers ---------------------------------------------------------


def _tiny_llama(tmp_path, model_type="llama"):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[model_type]
    config = config_cls(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = model_cls(config).eval()
    folder = tmp_path / model_type
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_hf_causal_lm_converts_exactly(tmp_path, model_type):
    from edgekit.models.hf_causal import load_folder

    hf, folder = _tiny_llama(tmp_path, model_type)
    model = load_folder(folder)
    ids = torch.randint(4, VOCAB_SIZE, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
    # and generation with the cache follows the Hugging Face model's own greedy decoding
    ours = generate(model, ids[:1], 6, stop_at_eos=False)
    theirs = hf.generate(ids[:1], max_new_tokens=6, do_sample=False, min_new_tokens=6)[:, 13:]
    assert torch.equal(ours, theirs)


def test_unsupported_hf_architecture_is_named(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from edgekit.models.hf_causal import load_folder

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UserError, match="gpt2 causal LM cannot become"):
        load_folder(tmp_path / "gpt2")


# -- the passes, end to end ----------------------------------------------------------

MICRO = """
name: event-log-micro
model: {source: zoo:event_log_teacher_micro}
data:
  source: synth:event_log:400
  holdout: 0.1
compress:
  - train.seq2seq: {steps: 40, batch_size: 16, eval_every: 20, eval_samples: 16}
  - distill.encdec: {steps: 30, batch_size: 16, eval_every: 15, eval_samples: 16}
export:
  - onnx: {opset: 17, verify: {samples: 3}}
bench:
  runtimes: [onnxruntime]
  threads: [1]
  batch_sizes: [1]
  warmup: 1
  repeats: 2
report: {formats: [json, md]}
"""


@pytest.mark.slow
def test_recipe_trains_distils_exports_and_reports(tmp_path):
    run = compress_recipe(tmp_path, MICRO)
    report = json.loads((run / "report.json").read_text())
    steps = {s["id"]: s for s in report["steps"]}
    distill = steps["02-distill.encdec"]["metrics"]["distill"]
    assert (distill["encoder_layers"], distill["decoder_layers"]) == (2, 1)
    assert distill["student_params"] <= distill["teacher_params"]
    assert [e["step"] for e in distill["evals"]] == [15, 30]
    export = steps["03-export.onnx"]["metrics"]
    assert export["verify"]["generation_equal"] and export["verify"]["passed"]
    assert export["verify"]["max_abs"] < 1e-3  # first-token logits, ONNX Runtime vs torch
    assert export["accuracy"]["metric"] == "exact_match"
    # the ONNX student answers exactly as the torch student it came from
    assert export["accuracy"]["value"] == steps["02-distill.encdec"]["metrics"]["accuracy"]["value"]
    gen = export["generation"][0]
    assert gen["new_tokens"] == 32 and gen["tokens_per_s"] > 0 and gen["first_token_ms"] > 0
    # the ONNX Runtime adapter serves the export as a session that generates
    from edgekit.artifact import Artifact
    from edgekit.runtimes import load_session

    art = Artifact.load(run / "steps" / "03-export.onnx" / "artifact")
    student = Artifact.load(run / "steps" / "02-distill.encdec" / "artifact").torch_module()
    pairs = _pairs(2)
    out = load_session(art).run({"input_ids": pairs.source.numpy(), "attention_mask": pairs.source_mask.numpy()})[0]
    want = generate(student, pairs.source, 32, pairs.source_mask).numpy()
    assert np.array_equal(out, want)
    # inspect lists both graphs' inputs and outputs
    from edgekit.profile import inspect_target

    info = inspect_target(str(run / "steps" / "03-export.onnx"), {})
    names = {t["name"] for t in info["inputs"]}
    assert {"encoder.input_ids", "decoder.decoder_input_ids", "decoder.past_key_0", "decoder.cross_key_0"} <= names
    assert info["params"] >= distill["student_params"]
    md = (run / "report.md").read_text()
    assert "## Encoder-decoder distillation" in md and "## Generation (ONNX Runtime, KV cache)" in md


def test_hf_teacher_distils_through_a_recipe(tmp_path):
    _, folder = _tiny_llama(tmp_path)
    run = compress_recipe(tmp_path, f"""
name: hf-teacher
model: {{source: "hf:{folder}", task: seq2seq, dims: {{seq: 64}}}}
data: {{source: "synth:event_log:64", holdout: 0.25}}
compress:
  - distill.encdec: {{steps: 3, batch_size: 8, eval_samples: 4, eval_every: 0, targets: teacher}}
report: {{formats: [json]}}
""")
    report = json.loads((run / "report.json").read_text())
    distill = report["steps"][-1]["metrics"]["distill"]
    assert distill["teacher_layers"] == 3 and (distill["encoder_layers"], distill["decoder_layers"]) == (2, 1)
    assert distill["targets"] == "teacher" and 0.0 <= distill["teacher_targets_match_data"] <= 1.0


def test_distill_refuses_a_model_that_is_not_a_text_lm(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, """
name: wrong-model
model: {source: zoo:digits_cnn_tiny}
data: {source: sklearn:digits}
compress:
  - distill.encdec: {steps: 2}
""")
    assert run_cli(["compress", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "distill.encdec works on edgekit's text-to-text LMs" in err and "Traceback" not in err


def test_seq2seq_training_needs_target_ids(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, """
name: no-targets
model: {source: zoo:event_log_teacher_micro}
data: {source: "synth:shapes_cls:20"}
compress:
  - train.seq2seq: {steps: 2}
""")
    assert run_cli(["compress", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("target_ids" in err or "makes" in err)


def test_event_log_rejects_a_sequence_too_short():
    with pytest.raises(UserError, match="model.dims.seq of at least"):
        event_log(4, 0, [], {"seq": 12})


def test_exact_match_metric_counts_whole_answers():
    from edgekit.metrics import exact_match

    target = np.array([[5, 6, 2, 0], [7, 2, 0, 0]])
    generated = np.array([[5, 6, 2, 0], [7, 3, 0, 0]])
    got = exact_match(generated, target, pad=0)
    assert got["rows"] == 0.5 and got["tokens"] == pytest.approx(4 / 5)
