"""`edgekit generate`, `edgekit train-drafter` and `bench.decoding` in recipes, end to end on tiny byte LMs."""

from __future__ import annotations

import json

import pytest

from tests.conftest import compress_recipe, run_cli, write_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CORPUS = "the cat sat on the mat. the dog sat on the log. " * 40

RECIPE = """
name: dec
model:
  source: zoo:tiny_lm_micro
  dims: {{batch: 1, seq: 32}}
data:
  source: text:corpus.txt
  holdout: 0.2
compress:
  - train.lm: {{steps: 40}}
bench:
  runtimes: [torch]
  threads: [1]
  warmup: 1
  repeats: 2
  decoding: {decoding}
report: {{formats: [json, md]}}
"""


def test_generate_compare_is_identical_to_plain_greedy(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = run_cli(["generate", "zoo:tiny_lm_micro", "--prompt", "abcabcabcabc", "--drafter", "aded", "--max-new-tokens", "24", "--compare", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["new_tokens"] == 24 and out["identical_to_plain"] is True
    assert out["passes"] <= 23  # the prefill gives the first token; each pass at least one more
    assert isinstance(out["text"], str)


def test_generate_token_ids_and_sampling(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["generate", "zoo:tiny_lm_micro", "--prompt-ids", "97,98,99,97,98,99", "--drafter", "ngram", "--max-new-tokens", "8",
            "--temperature", "0.8", "--seed", "3", "--json"]
    assert run_cli(args) == 0
    first = json.loads(capsys.readouterr().out)["tokens"]
    assert run_cli(args) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == first  # seeded: reproducible
    assert len(first) == 8 and all(0 <= t < 256 for t in first)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--drafter", "bogus"], "unknown drafter 'bogus'"),
        (["--drafter", "aded", "--drafter-option", "nope=1"], "has no setting nope"),
        (["--drafter", "swift"], "no intermediate layer to skip"),
        (["--drafter", "head"], "needs trained weights"),
        (["--drafter", "head", "--drafter-weights", "missing.npz"], "do not exist"),
        (["--drafter", "aded", "--drafter-data", "missing.txt"], "does not exist"),
        (["--compare", "--temperature", "0.5"], "drop --temperature"),
    ],
)
def test_generate_bad_input_exits_2_with_one_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert run_cli(["generate", "zoo:tiny_lm_micro", "--prompt", "hello", "--max-new-tokens", "4", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_generate_needs_one_prompt_and_a_known_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_cli(["generate", "zoo:tiny_lm_micro", "--max-new-tokens", "4"]) == 2
    assert "exactly one of --prompt" in capsys.readouterr().err
    assert run_cli(["generate", "zoo:no_such_model", "--prompt", "x"]) == 2
    assert "no_such_model" in capsys.readouterr().err


def test_train_drafter_then_generate_with_the_head(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text(CORPUS)
    assert run_cli(["train-drafter", "zoo:tiny_lm_micro", "--text", "corpus.txt", "--out", "head.npz", "--steps", "3", "--depth", "3"]) == 0
    assert (tmp_path / "head.npz").is_file() and not list(tmp_path.glob(".head.npz.*"))
    capsys.readouterr()
    code = run_cli(["generate", "zoo:tiny_lm_micro", "--prompt", "the cat", "--drafter", "head", "--drafter-weights", "head.npz",
                    "--max-new-tokens", "16", "--compare", "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["identical_to_plain"] is True


def test_recipe_bench_decoding_reports_each_drafter(tmp_path):
    (tmp_path / "corpus.txt").write_text(CORPUS)
    run = compress_recipe(tmp_path, RECIPE.format(decoding="{drafters: [ngram, aded], prompts: 2, prompt_tokens: 16, max_new_tokens: 16, rounds: 1}"))
    report = json.loads((run / "report.json").read_text())
    d = report["steps"][-1]["metrics"]["decoding"]
    assert [r["drafter"] for r in d["rows"]] == ["plain", "ngram", "aded"]
    assert all(r["exact"] for r in d["rows"])
    assert d["rows"][0]["tokens_per_pass"] == pytest.approx(1.0)
    assert "## Speculative decoding" in (run / "report.md").read_text()
    assert "decoding" not in report["steps"][0]["metrics"]  # only the final model is timed


def test_recipe_rejects_options_for_a_drafter_it_does_not_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text(CORPUS)
    recipe = write_recipe(tmp_path, RECIPE.format(decoding="{drafters: [ngram], options: {aded: {size: 8}}}"))
    assert run_cli(["recipe", "validate", str(recipe)]) == 2
    assert "options for aded" in capsys.readouterr().err


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_generate_on_a_hugging_face_llama_matches_its_own_greedy(tmp_path, monkeypatch, capsys, runtime):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=48, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "llama")
    prompt = [5, 9, 11, 5, 9, 11, 5, 9]
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    for drafter in ("aded", "ngram") + (("swift",) if runtime == "torch" else ()):
        code = run_cli(["generate", f"hf:{tmp_path / 'llama'}", "--prompt-ids", ",".join(map(str, prompt)), "--drafter", drafter,
                        "--max-new-tokens", "12", "--runtime", runtime, "--json"])
        assert code == 0
        assert json.loads(capsys.readouterr().out)["tokens"] == theirs, drafter
