"""Generation export of the decoder-only and encoder-decoder LMs to ONNX, and the ORT generation loop."""

import warnings

import numpy as np
import pytest
import torch

from tests.conftest import scrambled_weights
from edgekit.artifact import Artifact, TensorSpec
from edgekit.errors import StepFailed, UserError
from edgekit.export.encdec_onnx import export_generation, generation_meta
from edgekit.models.encdec import EOS, PAD, EncoderDecoderLM, generate, student_config
from edgekit.models.event_log import VOCAB_SIZE, event_log_teacher_micro
from edgekit.runtimes.generation import OrtGenerator, first_token_and_throughput, paired_generation, pick


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _decoder():
    torch.manual_seed(0)
    return scrambled_weights(event_log_teacher_micro(), 0)


def _encdec():
    torch.manual_seed(1)
    return scrambled_weights(EncoderDecoderLM(student_config(event_log_teacher_micro().cfg)), 1)


def _exported(tmp_path_factory, model, name: str):
    folder = tmp_path_factory.mktemp(name) / "graphs"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        files = export_generation(model, folder)
    tracer = [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    assert getattr(model, "encoder_calls", 0) == 0  # tracing does not count as reading a source
    return model, folder, files, tracer


@pytest.fixture(scope="module")
def decoder_export(tmp_path_factory):
    return _exported(tmp_path_factory, _decoder(), "decoder")


@pytest.fixture(scope="module")
def encdec_export(tmp_path_factory):
    return _exported(tmp_path_factory, _encdec(), "encdec")


def _generator(export) -> OrtGenerator:
    model, folder, files, _ = export
    return OrtGenerator.load(folder, files, generation_meta(model), threads=1)


def _tokens(shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(4, VOCAB_SIZE, size=shape, dtype=np.int64)


def _torch_generate(model, ids, n, mask=None, **kw) -> np.ndarray:
    return generate(model, torch.from_numpy(ids), n, None if mask is None else torch.from_numpy(mask), **kw).numpy()


def test_export_writes_checked_graphs_without_baked_sizes(decoder_export, encdec_export):
    for export, roles in ((decoder_export, {"decoder"}), (encdec_export, {"encoder", "decoder"})):
        _, folder, files, tracer = export
        assert set(files) == roles
        assert all((folder / f).is_file() for f in files.values())
        assert tracer == []  # positions (arange(t) + past length) stay dynamic
        assert not [p for p in folder.parent.iterdir() if p.name.endswith(".tmp")]  # scratch folder removed


@pytest.mark.parametrize("prompt_len", [1, 7])
def test_decoder_greedy_matches_torch(decoder_export, prompt_len):
    model = decoder_export[0]
    gen = _generator(decoder_export)
    for batch in (1, 2):
        ids = _tokens((batch, prompt_len), seed=prompt_len + batch)
        got = gen.generate(ids, 12, np.ones_like(ids), stop_at_eos=False)
        assert got.shape == (batch, 12)
        np.testing.assert_array_equal(got, _torch_generate(model, ids, 12, stop_at_eos=False))


def test_encdec_greedy_matches_torch_single_and_padded_batch(encdec_export):
    model = encdec_export[0]
    gen = _generator(encdec_export)
    one = _tokens((1, 9), seed=3)
    np.testing.assert_array_equal(gen.generate(one, 12, stop_at_eos=False), _torch_generate(model, one, 12, stop_at_eos=False))

    ids = _tokens((3, 10), seed=4)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = PAD
    for stop in (True, False):
        got = gen.generate(ids, 12, mask, stop_at_eos=stop)
        np.testing.assert_array_equal(got, _torch_generate(model, ids, 12, mask, stop_at_eos=stop))
    # the padded rows really depend on their mask: row 2 alone gives the same tokens as in the batch
    alone = gen.generate(ids[2:, :3], 12, stop_at_eos=False)
    np.testing.assert_array_equal(alone, gen.generate(ids, 12, mask, stop_at_eos=False)[2:])


def test_sampling_is_valid_and_reproducible(decoder_export, encdec_export):
    for export, ids in ((decoder_export, _tokens((2, 5), 5)), (encdec_export, _tokens((3, 8), 6))):
        gen = _generator(export)
        a = gen.generate(ids, 16, temperature=1.0, seed=7)
        b = gen.generate(ids, 16, temperature=1.0, seed=7)
        c = gen.generate(ids, 16, temperature=1.0, seed=8)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
        assert a.min() >= 0 and a.max() < VOCAB_SIZE
        for row in a:  # after EOS a row holds only PAD
            ends = np.flatnonzero(row == EOS)
            if ends.size:
                assert (row[ends[0] + 1 :] == PAD).all()


def test_pick_draws_from_softmax():
    logits = np.log(np.array([[1.0, 3.0, 0.0 + 1e-30]] * 20000))
    counts = np.bincount(pick(logits, 1.0, np.random.default_rng(0)), minlength=3) / 20000
    np.testing.assert_allclose(counts, [0.25, 0.75, 0.0], atol=0.02)
    assert (pick(logits[:1] * 0 + [[0.0, 1.0, 5.0]], 0.0, None) == [2]).all()


class _Counting:
    def __init__(self, session):
        self.session, self.calls = session, 0

    def run(self, *args, **kwargs):
        self.calls += 1
        return self.session.run(*args, **kwargs)


def test_encoder_runs_once_per_generate(encdec_export):
    gen = _generator(encdec_export)
    gen.sessions["encoder"] = encoder = _Counting(gen.sessions["encoder"])
    gen.sessions["decoder"] = decoder = _Counting(gen.sessions["decoder"])
    gen.generate(_tokens((2, 6), 9), 5, stop_at_eos=False)
    assert (encoder.calls, decoder.calls) == (1, 5)
    gen.generate(_tokens((2, 6), 10), 3, stop_at_eos=False)
    assert (encoder.calls, decoder.calls) == (2, 8)


def test_first_token_and_throughput(decoder_export, encdec_export):
    keys = None
    for export, ids in ((decoder_export, _tokens((1, 6), 11)), (encdec_export, _tokens((2, 6), 12))):
        stats = first_token_and_throughput(_generator(export), ids, 4, repeats=2, warmup=1)
        keys = keys or set(stats)
        assert set(stats) == keys
        assert stats["first_token_ms"] > 0 and stats["total_ms"] > 0 and stats["tokens_per_s"] > 0
        assert stats["batch"] == len(ids) and stats["new_tokens"] == 4
    with pytest.raises(UserError, match="new_tokens"):
        first_token_and_throughput(_generator(decoder_export), _tokens((1, 6), 11), 0)


def test_paired_generation_runs_in_turns_and_compares_to_the_first(decoder_export, encdec_export, monkeypatch):
    from edgekit.runtimes import generation

    order = []
    timed = generation._timed_run

    def recording(gen, ids, new_tokens, mask):
        order.append(gen.kind)
        return timed(gen, ids, new_tokens, mask)

    monkeypatch.setattr(generation, "_timed_run", recording)
    ids = _tokens((1, 6), 14)
    gens = {"teacher": _generator(decoder_export), "student": _generator(encdec_export)}
    stats = paired_generation(gens, ids, 4, {"student": np.ones_like(ids)}, repeats=3, warmup=1)
    # a warm-up turn, then three turns, each running both; the order rotates so neither always goes first
    assert order == ["decoder", "encdec"] + ["decoder", "encdec", "encdec", "decoder", "decoder", "encdec"]
    assert list(stats) == ["teacher", "student"] and all(s["repeats"] == 3 for s in stats.values())
    assert stats["teacher"]["vs_first"] == {"first_token": 1.0, "total": 1.0, "decode": 1.0}
    student = stats["student"]["vs_first"]
    assert all(v > 0 for v in student.values())
    assert set(stats["student"]) - {"vs_first"} == set(first_token_and_throughput(gens["student"], ids, 4, np.ones_like(ids), repeats=1))
    with pytest.raises(UserError, match="repeats"):
        paired_generation(gens, ids, 4, repeats=0)


def test_decoder_padded_prompt_is_refused(decoder_export):
    gen = _generator(decoder_export)
    ids = _tokens((2, 5), 13)
    mask = np.ones_like(ids)
    mask[1, 3:] = 0
    with pytest.raises(UserError, match="no padding"):
        gen.generate(ids, 4, mask)
    with pytest.raises(UserError, match="shape"):
        gen.generate(ids[0], 4)


def test_runtime_generates_without_torch(decoder_export):
    """The runtime side imports numpy and onnxruntime only, so it runs on a device without torch."""
    import json
    import subprocess
    import sys

    model, folder, files, _ = decoder_export
    ids = _tokens((1, 4), 15)
    code = (
        "import json, sys; import numpy as np; from edgekit.runtimes.generation import OrtGenerator; "
        "a = json.loads(sys.argv[1]); g = OrtGenerator.load(a['folder'], a['files'], a['meta']); "
        "out = g.generate(np.array(a['ids']), 6).tolist(); assert 'torch' not in sys.modules; print(json.dumps(out))"
    )
    arg = json.dumps({"folder": str(folder), "files": files, "meta": generation_meta(model), "ids": ids.tolist()})
    done = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == _torch_generate(model, ids, 6).tolist()


# -- the export.onnx pass ----------------------------------------------------------

_SPECS = [
    TensorSpec(name="input_ids", shape=["batch", "seq"], dtype="int64", low=4, high=VOCAB_SIZE),
    TensorSpec(name="attention_mask", shape=["batch", "seq"], dtype="int64", low=1, high=2),
]


class _RecordsData:
    """The part of RecipeData the export reads: an eval split of padded event_log sources."""

    def __init__(self, n: int):
        from edgekit.data import Split
        from edgekit.models.event_log import event_log

        self.eval = Split("eval", event_log(n, seed=0, inputs=list(_SPECS), dims={"seq": 64}).arrays)

    def has_split(self, name: str) -> bool:
        return name == "eval"

    def split(self, name: str):
        return self.eval


def _run_pass(tmp_path, model, data=None, **config):
    from edgekit.export.onnx import ExportOnnx, OnnxConfig
    from edgekit.passes import PassContext

    ctx = PassContext(workdir=tmp_path / "step", data=data, dims={"batch": 1, "seq": 10}, path="export[0].onnx")
    source = Artifact(format="torch", inputs=list(_SPECS), task="seq2seq", module=model, meta={"origin": "test"})
    return ExportOnnx(OnnxConfig(**config)).run(source, ctx), ctx


@pytest.mark.parametrize("make, with_data", [(_decoder, False), (_decoder, True), (_encdec, True)])
def test_export_onnx_pass_exports_generation_graphs(tmp_path, make, with_data):
    model = make()
    data = _RecordsData(5) if with_data else None
    exported, ctx = _run_pass(tmp_path, model, data, verify={"samples": 3})
    assert exported.format == "onnx" and exported.module is None
    assert exported.meta["origin"] == "test" and exported.meta["generation"] == generation_meta(model)
    verify = ctx.metrics["verify"]
    assert verify["generation_equal"] and verify["rows"] == 3 and verify["source"] == ("eval" if with_data else "random")
    assert ctx.metrics["export"]["graphs"] == exported.files
    # the saved artifact carries everything the torch-free runtime needs
    saved = Artifact.load(exported.save(tmp_path / "saved").folder)
    gen = OrtGenerator.load(saved.folder, saved.files, saved.meta["generation"])
    ids = _tokens((1, 5), 14)
    np.testing.assert_array_equal(gen.generate(ids, 6), _torch_generate(model, ids, 6))


def test_export_onnx_pass_fails_when_generation_differs(tmp_path, monkeypatch):
    import edgekit.models.encdec as encdec

    monkeypatch.setattr(encdec, "generate", lambda model, ids, n, mask=None: torch.full((len(ids), n), 5, dtype=torch.long))
    with pytest.raises(StepFailed, match="differs from PyTorch"):
        _run_pass(tmp_path, _decoder(), verify={"samples": 2})


def test_export_onnx_pass_refuses_settings_it_cannot_honour(tmp_path):
    with pytest.raises(UserError, match="torchscript"):
        _run_pass(tmp_path, _decoder(), exporter="dynamo")
