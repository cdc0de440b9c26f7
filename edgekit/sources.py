"""Model sources: where a recipe's model comes from.

``zoo:NAME``                 an architecture from edgekit.models (fresh weights)
``torch:FILE``               a state dict (``weights_only=True``) loaded into ``model.arch``
``onnx:FILE``                an ONNX model, used as is
``hf:DIR``                   a local Hugging Face transformers folder, loaded offline
``python:pkg.module:factory`` a factory you trust (``model.trust_python: true``)

Each source becomes an :class:`Artifact`. Torch artifacts carry a *builder*, a
JSON description from which :func:`build_torch_module` rebuilds the
architecture, so saved artifacts hold only tensors.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Any, Callable

from edgekit.artifact import Artifact, TensorSpec
from edgekit.errors import UserError
from edgekit.recipe import ModelSection

HF_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def load_source(model: ModelSection, resolve: Callable[[str], Path]) -> Artifact:
    """Load the recipe's model as an artifact, or raise a UserError naming the fix."""
    loader = {"zoo": _zoo, "torch": _torch_file, "onnx": _onnx_file, "hf": _hf_dir, "python": _python}[model.kind]
    artifact = loader(model, resolve)
    if model.task:
        artifact.task = model.task
    return artifact


def source_fingerprint(model: ModelSection, resolve: Callable[[str], Path]) -> str:
    """A hash of what the source step reads: the model section and its files' contents."""
    h = hashlib.sha256(json.dumps(model.model_dump(mode="json"), sort_keys=True).encode())
    if model.kind in ("torch", "onnx", "hf"):
        root = resolve(model.value)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for p in files:
            h.update(p.name.encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


# Structural changes a pass may record in a builder, by name. Only these can be
# named: an artifact.json must not be able to import arbitrary code.
TRANSFORMS = {
    "fold_bn": ("edgekit.compress.quantize.bn_fold", "fold_batchnorm"),
    "quantize": ("edgekit.compress.quantize.modules", "apply_plan"),
    "prune": ("edgekit.compress.prune.structure", "restructure"),
    "blockffn": ("edgekit.compress.moe.convert", "to_blockffn"),
    "tokens.transform": ("edgekit.compress.tokens.transform", "apply_token_schedule"),
    "tokens.feather": ("edgekit.compress.tokens.feather", "apply_feather"),
    "reparam": ("edgekit.models.reparam", "deploy_structure"),
}


def build_torch_module(builder: dict[str, Any]):
    """Rebuild a torch module's architecture (with fresh weights) from its builder."""
    import importlib

    module = _build_base(builder)
    for step in builder.get("transforms", []):
        if step.get("kind") not in TRANSFORMS:
            raise UserError(f"unknown model transform {step.get('kind')!r} in the artifact's builder; re-run the recipe with this edgekit version")
        mod_name, fn_name = TRANSFORMS[step["kind"]]
        module = getattr(importlib.import_module(mod_name), fn_name)(module, **step.get("args", {}))
    return module


def _build_base(builder: dict[str, Any]):
    kind = builder.get("kind")
    if kind == "zoo":
        from edgekit.models import create_model

        return create_model(builder["name"], **builder.get("args", {}))
    if kind == "hf":
        return _hf_module(Path(builder["path"]), builder["pooling"], builder["normalize"])
    if kind == "hf_vision":
        return _hf_vision_module(Path(builder["path"]))
    if kind == "python":
        return _call_factory(builder["target"], builder.get("args", {}))
    raise UserError(f"cannot rebuild a torch module from builder {builder!r}; re-run the recipe from its source")


# -- zoo and torch state dicts ---------------------------------------------------

def _zoo(model: ModelSection, resolve) -> Artifact:
    from edgekit.models import create_model, model_info

    info = model_info(model.value)
    import torch

    with torch.random.fork_rng():  # the same fresh weights every run, so a step key always means one model
        torch.manual_seed(0)
        module = create_model(model.value, **model.args).eval()
    return Artifact(
        format="torch",
        inputs=model.inputs or [s.model_copy() for s in info.inputs],
        task=info.task,
        builder={"kind": "zoo", "name": model.value, "args": model.args},
        module=module,
        meta={"source": model.source, "dims": dict(info.dims or {}), **_tokenizer_meta(module)},
    )


def _tokenizer_meta(module) -> dict[str, str]:
    """Zoo language models over raw UTF-8 bytes say so (``tokenizer = "bytes"``), so text data needs no tokenizer files."""
    return {"tokenizer": "bytes"} if getattr(module, "tokenizer", None) == "bytes" else {}


def _torch_file(model: ModelSection, resolve) -> Artifact:
    import pickle

    import torch

    path = resolve(model.value)
    if not path.is_file():
        raise UserError(f"model.source: {path} does not exist; check the path (relative paths start at the recipe's folder)")
    zoo = _zoo(model.model_copy(update={"source": f"zoo:{model.arch}"}), resolve)
    if not _looks_like_torch_file(path):
        raise UserError(f"model.source: {path} is not a torch state dict file; save one with torch.save(model.state_dict(), path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(
            f"model.source: {path} holds objects other than tensors ({str(e).splitlines()[0]}); "
            "save a plain state dict with torch.save(model.state_dict(), path)"
        ) from None
    except Exception as e:  # not a torch file at all
        raise UserError(f"model.source: {path} is not a torch state dict file ({type(e).__name__}); save one with torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"model.source: {path} is not a state dict (a mapping of names to tensors); save model.state_dict()")
    result = zoo.module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {', '.join(result.missing_keys[:3])}")
        if result.unexpected_keys:
            parts.append(f"unexpected {', '.join(result.unexpected_keys[:3])}")
        raise UserError(f"model.source: {path} does not fit model.arch {model.arch} ({'; '.join(parts)}); pick the architecture it was trained with")
    zoo.meta["source"] = model.source
    return zoo


def _looks_like_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive (or, in the legacy format, a pickle stream)."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(2)
    return zipfile.is_zipfile(path) or head[:1] == b"\x80"


# -- ONNX ------------------------------------------------------------------------

_ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 3: "int8", 2: "uint8", 9: "bool"}


def _onnx_file(model: ModelSection, resolve) -> Artifact:
    import onnx

    path = resolve(model.value)
    if not path.is_file():
        raise UserError(f"model.source: {path} does not exist; check the path (relative paths start at the recipe's folder)")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise UserError(f"model.source: {path} is not an ONNX model ({type(e).__name__}); export one or point at a .onnx file") from None
    if not proto.graph.node:
        raise UserError(f"model.source: {path} is not an ONNX model (no graph nodes); point at a .onnx file")
    initializers = {i.name for i in proto.graph.initializer}
    graph_inputs = [i for i in proto.graph.input if i.name not in initializers]
    found: list[TensorSpec] = []
    for gi in graph_inputs:
        tt = gi.type.tensor_type
        shape: list[int | str] = []
        for k, d in enumerate(tt.shape.dim):
            shape.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or ("batch" if k == 0 else f"{gi.name}_dim{k}")))
        dtype = _ONNX_DTYPES.get(tt.elem_type)
        if dtype is None:
            raise UserError(f"model.source: input {gi.name!r} of {path.name} has an unsupported element type {tt.elem_type}")
        found.append(TensorSpec(name=gi.name, shape=shape, dtype=dtype))
    inputs = model.inputs or found
    if model.inputs:
        _match_onnx_inputs(model.inputs, found, path.name)
    return Artifact(
        format="onnx",
        inputs=inputs,
        outputs=[o.name for o in proto.graph.output],
        folder=path.parent,
        files={"model": path.name},
        meta={"source": model.source},
    )


def _match_onnx_inputs(declared: list[TensorSpec], found: list[TensorSpec], fname: str) -> None:
    by_name = {s.name: s for s in found}
    for i, spec in enumerate(declared):
        real = by_name.get(spec.name)
        if real is None:
            raise UserError(f"model.inputs[{i}].name {spec.name!r} is not an input of {fname}; its inputs are {', '.join(by_name)}")
        if len(real.shape) != len(spec.shape) or any(
            isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(spec.shape, real.shape)
        ):
            raise UserError(f"model.inputs[{i}].shape {spec.shape} does not match {fname}'s input {spec.name} of shape {real.shape}; fix the recipe's shape")
    missing = set(by_name) - {s.name for s in declared}
    if missing:
        raise UserError(f"model.inputs lacks {', '.join(sorted(missing))}, which {fname} requires; declare every model input")


# -- Hugging Face ----------------------------------------------------------------

def _hf_dir(model: ModelSection, resolve) -> Artifact:
    path = resolve(model.value)
    if not (path / "config.json").is_file():
        raise UserError(f"model.source: {path} is not a Hugging Face model folder (no config.json); point at a folder saved with save_pretrained")
    from edgekit.models.hf_vision import is_vision_folder

    if is_vision_folder(path):
        return _hf_vision_dir(model, path)
    from edgekit.models.hf_causal import is_causal_lm_folder

    if is_causal_lm_folder(path):
        return _hf_causal_dir(model, path)
    module = _hf_module(path, model.hf.pooling, model.hf.normalize)
    forward_args = set(module.input_names)
    vocab = int(getattr(module.config, "vocab_size", 2) or 2)
    specs = [
        TensorSpec(name=n, shape=["batch", "seq"], dtype="int64", low=0, high=(vocab if n == "input_ids" else 2 if n != "token_type_ids" else 1))
        for n in HF_TEXT_INPUTS
        if n in forward_args
    ]
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))
    return Artifact(
        format="torch",
        inputs=model.inputs or specs,
        outputs=["embedding"] if model.hf.pooling != "none" else ["last_hidden_state"],
        task="embedding" if model.hf.pooling != "none" else "generic",
        builder={"kind": "hf", "path": str(path), "pooling": model.hf.pooling, "normalize": model.hf.normalize},
        module=module,
        meta={"source": model.source, "tokenizer_dir": str(path) if has_tokenizer else None, "dims": {"batch": 1, "seq": model.hf.max_length}},
    )


def _hf_vision_dir(model: ModelSection, path: Path) -> Artifact:
    """A Hugging Face image classifier (e.g. ViTForImageClassification): pixel_values in, logits out."""
    module = _hf_vision_module(path)
    return Artifact(
        format="torch",
        inputs=model.inputs or module.input_specs(),
        outputs=["logits"],
        task=model.task or "classification",
        builder={"kind": "hf_vision", "path": str(path)},
        module=module,
        meta={"source": model.source, "dims": {"batch": 1}},
    )


def _hf_causal_dir(model: ModelSection, path: Path) -> Artifact:
    """A Llama-family causal LM, converted to edgekit's DecoderLM (exports with a KV cache, distils)."""
    from edgekit.models.encdec import config_dict
    from edgekit.models.hf_causal import load_folder

    module = load_folder(path)
    specs = [
        TensorSpec(name="input_ids", shape=["batch", "seq"], dtype="int64", low=0, high=module.cfg.vocab),
        TensorSpec(name="attention_mask", shape=["batch", "seq"], dtype="int64", low=1, high=2),
    ]
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    return Artifact(
        format="torch",
        inputs=model.inputs or specs,
        outputs=["logits"],
        task=model.task or "lm",
        builder={"kind": "zoo", "name": "decoder_lm", "args": config_dict(module.cfg)},
        module=module,
        meta={"source": model.source, "tokenizer_dir": str(path) if has_tokenizer else None, "dims": {"batch": 1, "seq": model.hf.max_length}},
    )


def _hf_vision_module(path: Path):
    from edgekit.models.hf_vision import HFImageClassifier

    try:
        return HFImageClassifier.from_folder(path)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"model.source: cannot load a transformers image model from {path} offline ({first}); check the folder holds a valid config.json and weights") from None


def _hf_module(path: Path, pooling: str, normalize: bool):
    from edgekit.models.hf_encoder import HFEncoder

    try:
        return HFEncoder.from_folder(path, pooling=pooling, normalize=normalize).eval()
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"model.source: cannot load a transformers model from {path} offline ({first}); check the folder holds a valid config.json and weights") from None


# -- python factories ------------------------------------------------------------

def _python(model: ModelSection, resolve) -> Artifact:
    if not model.inputs:
        raise UserError("model.inputs is required for a python: source; declare each input's name, shape and dtype")
    target = model.value
    module = _call_factory(target, model.args)
    return Artifact(
        format="torch",
        inputs=model.inputs,
        task=model.task or "generic",
        builder={"kind": "python", "target": target, "args": model.args},
        module=module.eval(),
        meta={"source": model.source},
    )


def _call_factory(target: str, args: dict[str, Any]):
    import torch

    mod_name, _, attr = target.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise UserError(f"model.source: cannot import {mod_name} ({e}); make it importable (pip install it or add it to PYTHONPATH)") from None
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise UserError(f"model.source: {mod_name} has no callable {attr!r}; name a function that returns an nn.Module")
    module = factory(**args)
    if not isinstance(module, torch.nn.Module):
        raise UserError(f"model.source: {target} returned {type(module).__name__}, not a torch.nn.Module")
    return module


# -- checks before work ----------------------------------------------------------

def check_inputs(artifact: Artifact, dims: dict[str, int], where: str) -> None:
    """Run the model once on synthetic inputs so a wrong shape fails before any work."""
    from edgekit.runtimes import load_session

    feeds = {s.name: s.random(dims) for s in artifact.inputs}
    try:
        load_session(artifact).run(feeds)
    except UserError:
        raise
    except Exception as e:
        shapes = ", ".join(f"{s.name} {s.concrete_shape(dims)}" for s in artifact.inputs)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model.inputs ({shapes}) do not fit {where}: {first[:300]}; fix model.inputs shapes or dims") from None


# The format each source kind produces (known before loading, for early checks).
SOURCE_FORMATS = {"zoo": "torch", "torch": "torch", "hf": "torch", "python": "torch", "onnx": "onnx"}
