"""Datasets for a recipe: calibration, train and eval splits shaped to the model's inputs.

Sources (``data.source`` or a split's own ``source``):

``sklearn:digits``  the 8x8 handwritten digits from scikit-learn, scaled to [0, 1]
``text:FILE``       one sample per line, tokenized with the model's HF tokenizer; for a
                    byte-level language model (zoo models with ``tokenizer = "bytes"``)
                    the whole file as UTF-8 bytes, cut into consecutive windows of ``seq``
``npz:FILE``        arrays named like the model inputs, plus optional ``labels``
``images:DIR``      ``DIR/<class>/<image>``; labels follow the sorted class folders
``synth:NAME:N``    ``N`` samples of a dataset edgekit generates (``edgekit.models.datasets``),
                    shaped to the model's inputs; drawn from the recipe seed and the
                    source's YAML path, so a separate eval source never repeats train samples

One source is split deterministically (shuffled by the recipe seed): the last
``holdout`` share is eval, the rest train, and calibration is the first
``calibration.samples`` of train. A split with its own ``source`` uses that
whole source. :meth:`RecipeData.check` loads and validates every configured
source before any work starts; the loaded arrays are cached for the splits.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np

from edgekit.artifact import TensorSpec
from edgekit.errors import UserError
from edgekit.recipe import DATA_KINDS, DataSection, SplitSpec

SplitName = Literal["calibration", "train", "eval"]
SPLITS: tuple[str, ...] = ("calibration", "train", "eval")
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class Split:
    """Samples along axis 0 of every array; sample ``i`` is ``arrays[k][i:i+1]``."""

    name: str
    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    groups: np.ndarray | None = None  # a category per sample (e.g. question kind), for accuracy by group
    group_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0]) if self.arrays else 0

    def batches(self, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """Consecutive batches in order; the last one may be smaller."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        for start in range(0, len(self), batch_size):
            end = start + batch_size
            feeds = {k: v[start:end] for k, v in self.arrays.items()}
            yield feeds, (None if self.labels is None else self.labels[start:end])

    def feeds(self, n: int, batch_size: int = 1) -> list[dict[str, np.ndarray]]:
        """Up to ``n`` feed dicts of ``batch_size`` samples (fewer if the split is smaller)."""
        out: list[dict[str, np.ndarray]] = []
        for feeds, _ in self.batches(batch_size):
            if len(out) >= n:
                break
            out.append(feeds)
        return out

    def take(self, n: int | None, name: str | None = None) -> "Split":
        """The first ``n`` samples (all when ``n`` is None) as a new split."""
        sl = slice(None) if n is None else slice(0, n)
        labels = None if self.labels is None else self.labels[sl]
        groups = None if self.groups is None else self.groups[sl]
        return Split(name or self.name, {k: v[sl] for k, v in self.arrays.items()}, labels, groups, self.group_names)


@dataclass
class _Loaded:
    """One source read into memory, before splitting."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    files: list[Path] = field(default_factory=list)  # what was read, for the fingerprint
    groups: np.ndarray | None = None
    group_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0])

    def split(self, name: str) -> Split:
        return Split(name, dict(self.arrays), self.labels, self.groups, self.group_names)

    def select(self, index: np.ndarray, name: str) -> Split:
        labels = None if self.labels is None else self.labels[index]
        groups = None if self.groups is None else self.groups[index]
        return Split(name, {k: v[index] for k, v in self.arrays.items()}, labels, groups, self.group_names)


class RecipeData:
    """The recipe's ``data:`` section, loaded lazily and validated up front."""

    def __init__(
        self,
        section: DataSection,
        resolve: Callable[[str], Path],
        inputs: list[TensorSpec],
        dims: dict[str, int],
        tokenizer_dir: str | None,
        seed: int,
        byte_tokens: bool = False,
    ):
        self.section = section
        self.resolve = resolve
        self.inputs = list(inputs)
        self.dims = dict(dims)
        self.tokenizer_dir = tokenizer_dir
        self.seed = seed
        self.byte_tokens = byte_tokens
        self._sources: dict[str, _Loaded] = {}
        self._splits: dict[str, Split] = {}
        self._tokenizer = None

    # -- public ------------------------------------------------------------
    def has_split(self, name: str) -> bool:
        """Whether the recipe configures a source for this split."""
        spec = self._spec(name)
        if spec.source or self.section.source:
            return True
        return name == "calibration" and bool(self.section.train.source)

    def split(self, name: SplitName) -> Split:
        """A split, loaded once and cached."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; one of {', '.join(SPLITS)}")
        if name not in self._splits:
            self._splits[name] = self._make_split(name)
        return self._splits[name]

    def check(self, splits: tuple[str, ...] | list[str] | None = None) -> None:
        """Load and validate every configured source (or those of ``splits``); raise UserError on a problem."""
        for source, where in self._configured(splits):
            self._load(source, where)
        for name in splits or SPLITS:
            if self.has_split(name):
                self.split(name)  # cheap now: the sources are cached

    def fingerprint(self) -> str:
        """A short hash of the section, the specs it is shaped to and the stats of every file it reads."""
        h = hashlib.sha256()
        ident = {
            "section": self.section.model_dump(mode="json"),
            "inputs": [s.model_dump(mode="json") for s in self.inputs],
            "dims": self.dims,
            "seed": self.seed,
            "tokenizer_dir": self.tokenizer_dir,
            "byte_tokens": self.byte_tokens,
        }
        h.update(json.dumps(ident, sort_keys=True).encode())
        files: list[Path] = []
        for source, _ in self._configured(None):
            files += self._files_of(source)
        if self.tokenizer_dir and any(s.startswith("text:") for s, _ in self._configured(None)):
            tok = Path(self.tokenizer_dir)
            files += sorted(p for p in tok.iterdir() if p.is_file()) if tok.is_dir() else []
        for p in files:
            try:
                st = p.stat()
            except OSError:
                continue
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    # -- splitting ---------------------------------------------------------
    def _spec(self, name: str) -> SplitSpec:
        return getattr(self.section, name)

    def _configured(self, splits) -> list[tuple[str, str]]:
        """(source, yaml path) pairs that the given splits read, without duplicates."""
        out: dict[str, str] = {}
        names = list(splits or SPLITS)
        if self.section.source and any(not self._spec(n).source for n in names):
            out.setdefault(self.section.source, "data.source")
        for n in names:
            src = self._spec(n).source
            if src:
                out.setdefault(src, f"data.{n}.source")
        if "calibration" in names and not self.section.calibration.source and not self.section.source and self.section.train.source:
            out.setdefault(self.section.train.source, "data.train.source")
        return list(out.items())

    def _make_split(self, name: str) -> Split:
        spec = self._spec(name)
        if spec.source:
            return self._load(spec.source, f"data.{name}.source").split(name).take(spec.samples)
        if name == "calibration":
            return self._train_pool().take(spec.samples, "calibration")
        if not self.section.source:
            raise UserError(f"data.{name} has no source and data.source is not set; set data.source or data.{name}.source")
        train, evals = self._holdout()
        return (train if name == "train" else evals).take(spec.samples, name)

    def _train_pool(self) -> Split:
        """Everything train may draw from (calibration takes its first samples)."""
        if self.section.train.source:
            return self._load(self.section.train.source, "data.train.source").split("train")
        if not self.section.source:
            raise UserError("data.calibration has no source and neither data.source nor data.train.source is set; set data.source")
        return self._holdout()[0]

    def _holdout(self) -> tuple[Split, Split]:
        loaded = self._load(self.section.source, "data.source")  # type: ignore[arg-type]
        n = len(loaded)
        if n < 2:
            raise UserError(f"data.source: {self.section.source} has {n} sample; splitting it needs at least 2 (or give data.eval.source)")
        order = np.random.default_rng(self.seed).permutation(n)
        n_eval = min(n - 1, max(1, math.ceil(n * self.section.holdout)))
        return loaded.select(order[: n - n_eval], "train"), loaded.select(order[n - n_eval :], "eval")

    # -- loading -----------------------------------------------------------
    def _load(self, source: str, where: str) -> _Loaded:
        if source not in self._sources:
            kind, _, value = source.partition(":")
            if kind not in DATA_KINDS or not value:
                raise UserError(f"{where}: {source!r} is not a data source; use one of sklearn:digits, text:FILE, npz:FILE, images:DIR, synth:NAME:N")
            loader = {"sklearn": self._sklearn, "text": self._text, "npz": self._npz, "images": self._images, "synth": self._synth}[kind]
            loaded = loader(value, where)
            if len(loaded) == 0:
                raise UserError(f"{where}: {source} holds no samples; add some")
            self._sources[source] = loaded
        return self._sources[source]

    def _files_of(self, source: str) -> list[Path]:
        """Files a source reads, found without loading it (for the fingerprint)."""
        kind, _, value = source.partition(":")
        if kind in ("text", "npz"):
            return [self.resolve(value)]
        if kind == "images":
            root = self.resolve(value)
            return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if root.is_dir() else []
        return []

    def _single_input(self, kind: str, where: str) -> TensorSpec:
        if len(self.inputs) != 1:
            names = ", ".join(s.name for s in self.inputs)
            raise UserError(f"{where}: {kind} data feeds one input but the model takes {len(self.inputs)} ({names}); use npz:FILE with one array per input")
        return self.inputs[0]

    def _sample_shape(self, spec: TensorSpec) -> list[int]:
        return spec.concrete_shape(self.dims)[1:]

    def _sklearn(self, value: str, where: str) -> _Loaded:
        if value != "digits":
            raise UserError(f"{where}: sklearn:{value} is not available; the only sklearn source is sklearn:digits")
        from sklearn.datasets import load_digits

        spec = self._single_input("sklearn:digits", where)
        if spec.dtype not in ("float32", "float16"):
            raise UserError(f"{where}: sklearn:digits gives float images but input {spec.name} is {spec.dtype}; declare it float32")
        shape = self._sample_shape(spec)
        if math.prod(shape) != 64:
            raise UserError(
                f"{where}: sklearn:digits gives 8x8 images (64 values) but input {spec.name} expects per-sample shape {shape}; "
                "use e.g. [batch, 1, 8, 8]"
            )
        digits = load_digits()
        x = (digits.images / 16.0).astype(spec.dtype)
        if spec.layout == "NHWC" and len(shape) == 3:
            x = x[..., None]
        return _Loaded({spec.name: x.reshape(len(x), *shape)}, digits.target.astype(np.int64))

    def _synth(self, value: str, where: str) -> _Loaded:
        from edgekit.models.datasets import generate

        name, _, count = value.rpartition(":")
        if not name or not count.isdigit() or int(count) < 1:
            raise UserError(f"{where}: synth:{value} needs a dataset name and a sample count, e.g. synth:shapes_cls:2000")
        # A seed per YAML path: data.source and data.eval.source draw different samples.
        seed = int.from_bytes(hashlib.sha256(f"{self.seed}:{where}".encode()).digest()[:4], "little")
        data = generate(name, int(count), seed, self.inputs, self.dims)
        arrays = {s.name: np.ascontiguousarray(data.arrays[s.name].astype(s.dtype, copy=False)) for s in self.inputs}
        # arrays the model does not take (e.g. target_ids of a text-to-text set) ride along for the passes
        arrays.update({k: v for k, v in data.arrays.items() if k not in arrays})
        for spec in self.inputs:
            got, want = list(arrays[spec.name].shape[1:]), self._sample_shape(spec)
            if got != want:
                raise UserError(f"{where}: synth:{name} makes {spec.name} samples of shape {got} but the model expects {want}; fix model.dims or the model's input size")
        labels = None if data.labels is None else data.labels.astype(np.int64)
        groups = None if data.groups is None or not data.group_names else np.asarray(data.groups, np.int64)
        return _Loaded(arrays, labels, groups=groups, group_names=tuple(data.group_names))

    def _existing(self, value: str, where: str, what: str, folder: bool = False) -> Path:
        path = self.resolve(value)
        ok = path.is_dir() if folder else path.is_file()
        if not ok:
            raise UserError(
                f"{where}: {what} {value} does not exist (looked for {path}); "
                "fix the path (relative paths start at the recipe's folder)"
            )
        return path

    def _npz(self, value: str, where: str) -> _Loaded:
        import zipfile

        path = self._existing(value, where, "npz file")
        try:
            with np.load(path, allow_pickle=False) as z:
                raw = {k: z[k] for k in z.files}
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            raise UserError(f"{where}: {value} is not a valid npz file ({type(e).__name__}); write one with numpy.savez") from None
        arrays: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            if spec.name not in raw:
                present = ", ".join(sorted(raw)) or "none"
                raise UserError(f"{where}: {value} has no array {spec.name!r} for model input {spec.name} (arrays present: {present}); save one named like each input")
            arrays[spec.name] = self._fit_array(raw[spec.name], spec, where, value)
        n = {len(a) for a in arrays.values()}
        if len(n) > 1:
            raise UserError(f"{where}: the arrays in {value} have different sample counts ({sorted(n)}); give every input the same number of samples")
        labels = None
        if "labels" in raw:
            labels = raw["labels"]
            if labels.ndim != 1 or len(labels) != next(iter(n)) or not np.issubdtype(labels.dtype, np.integer):
                raise UserError(f"{where}: 'labels' in {value} must be a 1-D integer array with one label per sample; got {labels.dtype} {list(labels.shape)}")
            labels = labels.astype(np.int64)
        return _Loaded(arrays, labels, [path])

    def _fit_array(self, arr: np.ndarray, spec: TensorSpec, where: str, value: str) -> np.ndarray:
        """Check one npz array against its spec (sample shape, dtype) and cast it."""
        expected: list[int | str] = []
        for d in spec.shape[1:]:
            expected.append(d if isinstance(d, int) else self.dims.get(d, d))
        got = list(arr.shape[1:])
        fits = arr.ndim == len(spec.shape) and all(isinstance(e, str) or e == g for e, g in zip(expected, got))
        if not fits:
            raise UserError(
                f"{where}: array {spec.name!r} in {value} has per-sample shape {got} but input {spec.name} expects {expected} "
                f"(full shape {list(arr.shape)}; axis 0 counts samples)"
            )
        if not np.can_cast(arr.dtype, spec.dtype, casting="same_kind"):
            raise UserError(f"{where}: array {spec.name!r} in {value} is {arr.dtype} but input {spec.name} is {spec.dtype}; save it as {spec.dtype}")
        return np.ascontiguousarray(arr.astype(spec.dtype, copy=False))

    def _text(self, value: str, where: str) -> _Loaded:
        path = self._existing(value, where, "text file")
        if self.byte_tokens:
            return self._byte_windows(path, value, where)
        if not self.tokenizer_dir:
            raise UserError(f"{where}: text:{value} needs a tokenizer, and only hf: models bring one; use an hf: model folder with its tokenizer or npz:FILE data")
        unknown = [s.name for s in self.inputs if s.name not in TEXT_INPUTS]
        if unknown:
            raise UserError(f"{where}: text data can feed {', '.join(TEXT_INPUTS)} but the model also takes {', '.join(unknown)}; use npz:FILE data")
        try:
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError:
            raise UserError(f"{where}: {value} is not UTF-8 text; save it as UTF-8 with one sample per line") from None
        lines = [ln for ln in lines if ln]
        if not lines:
            raise UserError(f"{where}: {value} has no non-empty lines; put one sample per line")
        seq = self._seq_length(where)
        enc = self._tokenize(lines, seq)
        arrays: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            a = enc.get(spec.name)
            if a is None:  # e.g. token_type_ids from a tokenizer that has none: one segment
                a = np.zeros_like(enc["input_ids"])
            arrays[spec.name] = np.ascontiguousarray(np.asarray(a).astype(spec.dtype))
        return _Loaded(arrays, None, [path])

    def _byte_windows(self, path: Path, value: str, where: str) -> _Loaded:
        """Consecutive, non-overlapping windows of ``seq`` UTF-8 bytes: the samples of a byte-level language model."""
        if [s.name for s in self.inputs] != ["input_ids"]:
            raise UserError(f"{where}: byte-level text feeds one input_ids input, but the model takes {', '.join(s.name for s in self.inputs)}; use npz:FILE data")
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{where}: {value} is not UTF-8 text; save it as UTF-8") from None
        from edgekit.models.byte_text import windows

        seq = self._seq_length(where)
        if len(data) < seq:
            raise UserError(f"{where}: {value} has {len(data)} bytes, fewer than one window of {seq}; use a longer text or a smaller model.dims.seq")
        tokens = windows(np.frombuffer(data, dtype=np.uint8), seq)
        return _Loaded({"input_ids": tokens.astype(self.inputs[0].dtype)}, None, [path])

    def _seq_length(self, where: str) -> int:
        if self.dims.get("seq"):
            return int(self.dims["seq"])
        for spec in self.inputs:
            if len(spec.shape) >= 2:
                d = spec.shape[1]
                if isinstance(d, int):
                    return d
                if d in self.dims:
                    return int(self.dims[d])
        raise UserError(f"{where}: no sequence length for text data; set model.dims.seq (or give inputs a fixed length)")

    def _tokenize(self, lines: list[str], seq: int) -> dict[str, np.ndarray]:
        if self._tokenizer is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the folder must hold everything
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir, local_files_only=True)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot load a tokenizer from {self.tokenizer_dir} ({str(e).splitlines()[0][:200]}); the model folder needs tokenizer files") from None
        enc = self._tokenizer(lines, padding="max_length", truncation=True, max_length=seq, return_tensors="np")
        return {k: np.asarray(v) for k, v in enc.items()}

    def _images(self, value: str, where: str) -> _Loaded:
        from PIL import Image, UnidentifiedImageError

        root = self._existing(value, where, "image folder", folder=True)
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise UserError(f"{where}: {value} has no class subfolders; lay it out as {value}/<class>/<image>.png")
        spec = self._single_input("images", where)
        if spec.dtype not in ("float32", "float16"):
            raise UserError(f"{where}: images become float pixels in [0, 1] but input {spec.name} is {spec.dtype}; declare it float32")
        shape = spec.concrete_shape(self.dims)
        nhwc = spec.layout == "NHWC"
        if len(shape) != 4:
            raise UserError(f"{where}: images need a 4-D input (batch, C, H, W) but {spec.name} has shape {spec.shape}")
        c, h, w = (shape[3], shape[1], shape[2]) if nhwc else (shape[1], shape[2], shape[3])
        if c not in (1, 3):
            raise UserError(f"{where}: input {spec.name} has {c} channels; images load as 1 (grayscale) or 3 (RGB) channels")
        mode = "L" if c == 1 else "RGB"
        pixels, labels, files = [], [], []
        for label, cls in enumerate(classes):
            for p in sorted((root / cls).iterdir()):
                if p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file():
                    continue
                try:
                    with Image.open(p) as im:
                        img = im.convert(mode).resize((w, h), Image.Resampling.BILINEAR)
                except (UnidentifiedImageError, OSError) as e:
                    raise UserError(f"{where}: cannot read image {p} ({type(e).__name__}); remove or replace it") from None
                a = np.asarray(img, dtype=np.float32) / 255.0
                a = a.reshape(h, w, c)
                pixels.append(a if nhwc else a.transpose(2, 0, 1))
                labels.append(label)
                files.append(p)
        if not pixels:
            raise UserError(f"{where}: the class folders of {value} hold no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        x = np.stack(pixels).astype(spec.dtype)
        return _Loaded({spec.name: x}, np.asarray(labels, dtype=np.int64), files)
