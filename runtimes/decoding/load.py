"""What ``edgekit generate`` and ``edgekit train-drafter`` decode with: a target and a tokenizer.

MODEL is a recipe model source (``zoo:NAME``, ``hf:DIR`` for a Llama-family checkpoint,
``torch:FILE`` with ``--arch``), a saved step's artifact folder, or a folder written by
``export_verifier`` (ONNX Runtime, no torch needed). Byte-level models (edgekit's zoo LMs)
say so in their artifact and need no tokenizer; a Hugging Face folder brings its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgekit.errors import UserError

VERIFIER_META = "verifier.json"


@dataclass
class Tokenizer:
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    eos: int | None = None


def byte_tokenizer() -> Tokenizer:
    from edgekit.models import byte_text

    return Tokenizer(lambda s: byte_text.encode(s).tolist(), lambda ids: byte_text.decode(ids), None)


def hf_tokenizer(folder: str | Path) -> Tokenizer:
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises many kinds for a folder without tokenizer files
        raise UserError(f"cannot load a tokenizer from {folder} offline ({type(e).__name__}); pass --tokenizer bytes or a folder with tokenizer files") from None
    return Tokenizer(lambda s: tok.encode(s), lambda ids: tok.decode(ids), tok.eos_token_id)


def torch_module(model: str, arch: str | None = None) -> tuple[Any, dict[str, Any]]:
    """The torch module of MODEL (a source string or an artifact folder) and its artifact meta."""
    from edgekit.artifact import Artifact

    path = Path(model)
    if path.is_dir() and (path / "artifact.json").is_file():
        art = Artifact.load(path)
    elif path.is_dir() and (path / "artifact" / "artifact.json").is_file():
        art = Artifact.load(path / "artifact")  # a step folder
    else:
        from pydantic import ValidationError

        from edgekit.recipe import ModelSection
        from edgekit.sources import load_source

        try:
            section = ModelSection(source=model, arch=arch)
        except ValidationError as e:
            msg = e.errors()[0]["msg"].removeprefix("Value error, ")
            raise UserError(f"MODEL {model!r}: {msg} (or pass a step's artifact folder or a verifier export folder)") from None
        art = load_source(section, lambda p: Path(p).expanduser().resolve())
    if art.format != "torch":
        raise UserError(f"{model} is a {art.format} artifact; generate runs torch models or verifier exports (export one with --runtime onnxruntime)")
    return art.torch_module(), dict(art.meta)


def load_target(model: str, runtime: str = "torch", arch: str | None = None, threads: int | None = None, scratch: Path | None = None):
    """(target, artifact meta) for MODEL on ``runtime`` (torch or onnxruntime)."""
    path = Path(model)
    if (path / VERIFIER_META).is_file():
        from edgekit.runtimes.decoding.ort_target import OrtTarget

        target = OrtTarget.load(path, threads=threads)
        return target, dict(target.meta)
    if runtime not in ("torch", "onnxruntime"):
        raise UserError(f"--runtime must be torch or onnxruntime, got {runtime!r}")
    module, meta = torch_module(model, arch)
    if threads:
        import torch

        torch.set_num_threads(threads)
    if runtime == "torch":
        from edgekit.runtimes.decoding.target import TorchTarget

        return TorchTarget(module), meta
    if scratch is None:
        raise UserError("an ONNX Runtime target needs a folder for its export")
    from edgekit.export.decoding_onnx import export_verifier
    from edgekit.runtimes.decoding.ort_target import OrtTarget

    export_verifier(module, scratch)
    target = OrtTarget.load(scratch, threads=threads)
    return target, meta


def tokenizer_for(meta: dict[str, Any], choice: str | None) -> Tokenizer | None:
    """``--tokenizer bytes`` / a folder, else what the model says it uses; None: token ids only."""
    if choice == "bytes" or (choice is None and meta.get("tokenizer") == "bytes"):
        return byte_tokenizer()
    if choice:
        return hf_tokenizer(choice)
    if meta.get("tokenizer_dir"):
        return hf_tokenizer(meta["tokenizer_dir"])
    return None
