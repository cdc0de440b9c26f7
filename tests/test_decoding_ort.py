"""Speculative decoding on ONNX Runtime: the verifier export and OrtTarget against TorchTarget."""

import json
import subprocess
import sys
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, scrambled_weights
from edgekit.errors import UserError
from edgekit.export.decoding_onnx import check_verifier, export_verifier
from edgekit.models.encdec import DecoderLM, EncoderDecoderLM, LMConfig, student_config
from edgekit.runtimes.decoding import generate
from edgekit.runtimes.decoding.drafters import make_drafter
from edgekit.runtimes.decoding.drafters.head import train_head
from edgekit.runtimes.decoding.ort_target import OrtTarget
from edgekit.runtimes.decoding.target import TorchTarget

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = LMConfig(vocab=64, dim=32, heads=4, kv_heads=2, ffn=64, layers=3)
PROMPT = [1, 5, 9, 13, 5, 9, 13, 7, 5, 9]  # repeats, so prompt lookup finds drafts


def _model(tie: bool = True, seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    return scrambled_weights(DecoderLM(replace(CFG, tie_embeddings=tie)), seed)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _model()
    folder = tmp_path_factory.mktemp("verifier") / "export"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        meta = export_verifier(model, folder)
    tracer = [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    return model, folder, meta, tracer


def _close(a: np.ndarray, b: np.ndarray, rtol: float = 1e-4) -> bool:
    return float(np.abs(a - b).max()) <= rtol * max(float(np.abs(b).max()), 1e-6)


def test_export_writes_a_complete_folder(exported):
    model, folder, meta, tracer = exported
    assert tracer == []  # token and cache lengths stay dynamic
    assert sorted(p.name for p in folder.iterdir()) == ["embedding.npy", "verifier.json", "verifier.onnx"]  # tied: no lm_head.npy
    assert json.loads((folder / "verifier.json").read_text()) == meta
    assert meta["kind"] == "verifier" and (meta["layers"], meta["vocab"], meta["dim"], meta["head_dim"]) == (3, 64, 32, 8)
    assert not [p for p in folder.parent.iterdir() if p.name.endswith(".tmp")]  # scratch folder removed
    assert check_verifier(model, folder) < 1e-4


def test_forward_and_keep_match_torch(exported):
    model, folder, _, _ = exported
    ort_t, torch_t = OrtTarget.load(folder, threads=1), TorchTarget(model)
    tree = np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 0, 1, 1, 0], [1, 1, 0, 0, 1]], dtype=bool)
    steps = [  # (tokens, positions, tree mask, keep indices of the block)
        (PROMPT, None, None, None),
        ([3, 4, 6], None, None, [0, 1]),  # a chain, its prefix kept
        ([8, 20, 21, 22, 23], None, tree, [0, 2, 3]),  # a tree, a branch kept (positions from the depths below)
        ([30], None, None, []),  # rolled back
    ]
    for tokens, _, mask, keep in steps:
        base = torch_t.length
        pos = None if mask is None else base + np.array([0, 1, 1, 2, 2])
        for target in (ort_t, torch_t):
            assert target.length == base
        got, want = ort_t.forward(tokens, pos, mask), torch_t.forward(tokens, pos, mask)
        assert got[0].shape == (len(tokens), 64) and got[1].shape == (len(tokens), 32)
        assert _close(got[0], want[0]) and _close(got[1], want[1])
        if keep is not None:
            ort_t.keep(base, keep)
            torch_t.keep(base, keep)
        for (gk, gv), (wk, wv) in zip(ort_t.cache_arrays(), torch_t.cache_arrays(), strict=True):
            assert gk.shape == wk.shape == (2, ort_t.length, 8)
            assert _close(gk, wk) and _close(gv, wv)
    np.testing.assert_array_equal(ort_t.embedding(), torch_t.embedding())
    np.testing.assert_array_equal(ort_t.head(), torch_t.head())
    ort_t.reset()
    assert ort_t.length == 0 and ort_t.cache_arrays() == []
    with pytest.raises(UserError, match="cannot keep"):
        ort_t.keep(0, [0])


def test_generation_matches_torch_with_every_drafter(exported):
    model, folder, _, _ = exported
    ort_t, torch_t = OrtTarget.load(folder, threads=1), TorchTarget(model)
    want = generate(torch_t, None, PROMPT, 24).tokens
    assert len(set(want)) > 3  # scrambled weights: the text varies
    assert generate(ort_t, None, PROMPT, 24).tokens == want
    head = train_head(model, np.random.default_rng(0).integers(0, 64, size=200), steps=5, batch=4, seq=32)
    own_text = np.array(PROMPT + want)  # seeds aded with what the model writes, so its drafts get accepted
    for name, options in (("ngram", {}), ("aded", {}), ("aded", {"corpus": own_text}), ("head", {"weights": head})):
        got = generate(ort_t, make_drafter(name, ort_t, **options), PROMPT, 24)
        assert got.tokens == want, name
        assert sum(got.drafted) > 0, name  # the drafter did propose: the draft path was exercised
        if "corpus" in options:
            assert sum(got.accepted) > 0  # rollback to an accepted branch, not only to the pending token

def test_untied_head_is_exported(tmp_path):
    model = _model(tie=False, seed=3)
    meta = export_verifier(model, tmp_path / "untied")
    assert meta["files"]["lm_head"] == "lm_head.npy"
    target = OrtTarget.load(tmp_path / "untied")
    np.testing.assert_array_equal(target.head(), model.lm_head.weight.detach().numpy())
    assert not np.array_equal(target.head(), target.embedding())


def test_swift_needs_a_torch_target(exported):
    with pytest.raises(UserError, match="swift"):
        make_drafter("swift", OrtTarget.load(exported[1]))


def test_missing_or_wrong_export_is_a_user_error(tmp_path, exported):
    with pytest.raises(UserError, match="export_verifier"):
        OrtTarget.load(tmp_path / "nowhere")
    (tmp_path / "verifier.json").write_text(json.dumps({**exported[2], "files": {"graph": "gone.onnx"}}))
    with pytest.raises(UserError, match="gone.onnx.*export_verifier"):
        OrtTarget.load(tmp_path)
    with pytest.raises(UserError, match="DecoderLM"):
        export_verifier(EncoderDecoderLM(student_config(CFG)), tmp_path / "x")


def test_ort_target_does_not_import_torch():
    code = "import sys, edgekit.runtimes.decoding.ort_target; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_tinylm_with_blockffn_exports_a_verifier_that_decodes_like_torch(tmp_path):
    from edgekit.models.tiny_lm import TinyLM

    torch.manual_seed(0)
    model = scrambled_weights(TinyLM(dim=32, layers=3, heads=4, ffn=64, max_seq=64, experts=4), 0).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # no size baked into the graph
        meta = export_verifier(model, tmp_path / "v")
    assert meta["max_len"] == 64 and meta["tokenizer"] == "bytes" and meta["kv_heads"] == 4
    ort_target, torch_target = OrtTarget.load(tmp_path / "v"), TorchTarget(model)
    want = generate(torch_target, None, PROMPT, 20).tokens
    for name in ("ngram", "aded"):
        assert generate(ort_target, make_drafter(name, ort_target), PROMPT, 20).tokens == want, name
    with pytest.raises(UserError, match="at most 64 tokens"):
        generate(ort_target, None, PROMPT, 60)
