"""The small language models bench/decoding.py decodes with, trained here on text that ships with the project.

Two byte-level corpora (vocabulary 256, edgekit.models.byte_text):

  prose   examples/data/python_docs_sentences.txt (English sentences from CPython's docs)
  code    Python source of the running interpreter's own standard library: the .py files
          of CODE_SOURCES (no test suites, no generated tables), sorted by path, each after
          a header line naming it, whole files up to CODE_BYTES. The same on every machine
          with the same Python release (the corpus hash is part of the cache key).

The last HOLDOUT of each corpus is held out: the held-out loss is measured on it and the
benchmark's prompts come from it (:func:`prompts`).

Each corpus trains one edgekit ``DecoderLM`` (Llama layout, CONFIG) for STEPS AdamW steps
on random windows, seeded, on TRAIN_THREADS threads (env BENCH_TRAIN_THREADS, default 2).
The state_dict is cached under ``default_cache_dir() / "bench_decoding"`` in a file named
by a hash of the config, the training settings and the corpus: changing any of them retrains.

:func:`blockffn_model` is the BlockFFN TinyLM of bench/blockffn_e2e.py (cached by its pipeline).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edgekit import fsio
from edgekit.models.byte_text import encode
from edgekit.models.encdec import DecoderLM, LMConfig, count_params
from edgekit.pipeline import default_cache_dir

HERE = Path(__file__).resolve().parent
PROSE = HERE.parent / "examples" / "data" / "python_docs_sentences.txt"
CACHE = default_cache_dir() / "bench_decoding"

# Standard-library packages (every .py below them, test folders excluded) and single modules:
# ordinary, varied library code, about 1.45 MB with Python 3.11, so the safety cap CODE_BYTES
# cuts nothing there and the held-out tail is the end of unittest/ (mock.py .. util.py).
# Left out: test suites, generated tables (encodings/, locale.py's alias table) and the big
# single-style packages (asyncio, email) that would crowd out the rest.
CODE_SOURCES = (
    "argparse.py", "collections", "concurrent", "contextlib.py", "csv.py", "dataclasses.py", "enum.py",
    "fractions.py", "functools.py", "heapq.py", "http", "json", "logging", "pathlib.py", "queue.py",
    "random.py", "shutil.py", "statistics.py", "string.py", "tempfile.py", "textwrap.py", "unittest",
)
CODE_BYTES = 1_500_000
HOLDOUT = 0.05

CONFIG = LMConfig(vocab=256, dim=192, heads=3, kv_heads=1, ffn=512, layers=6, pad=0, bos=1, eos=2)
STEPS = 800
# Threads for training only (the weights depend on it only through float summation order).
# Where another job holds one of the 2 cores, 2 OpenMP threads ran a step 10x slower than 1
# (9.2 s against 0.9 s: every small op waits for the descheduled thread), hence the override.
TRAIN_THREADS = int(os.environ.get("BENCH_TRAIN_THREADS", "2"))
# Everything else that shapes the trained weights; part of the cache key. Bump "version"
# when the training code changes in a way these numbers do not show.
TRAIN = {"version": 1, "batch": 16, "seq": 128, "lr": 3e-3, "min_lr": 3e-4, "warmup": 50, "weight_decay": 0.1,
         "betas": (0.9, 0.95), "clip": 1.0, "seed": 0, "holdout": HOLDOUT}
EVAL_WINDOWS = 256  # held-out windows of TRAIN["seq"] + 1 bytes (fewer if the tail is shorter)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- corpora ------------------------------------------------------------------------------


@cache
def prose_tokens() -> np.ndarray:
    """The prose corpus as byte ids (uint8)."""
    return encode(PROSE.read_text(encoding="utf-8"))


def code_files() -> list[Path]:
    """The stdlib .py files of the code corpus, sorted by their path relative to the stdlib."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for name in CODE_SOURCES:
        p = stdlib / name
        if p.is_dir():
            files += [f for f in p.rglob("*.py") if not any(part.startswith("test") for part in f.relative_to(stdlib).parts)]
        elif p.is_file():
            files.append(p)
    return sorted(files, key=lambda f: f.relative_to(stdlib).as_posix())


@cache
def code_tokens() -> np.ndarray:
    """The code corpus as byte ids: whole files (a header line each) while they fit in CODE_BYTES."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for f in code_files():
        text = f"# ==== {f.relative_to(stdlib).as_posix()} ====\n" + f.read_text(encoding="utf-8") + "\n\n"
        n = len(text.encode("utf-8"))
        if size + n > CODE_BYTES:
            break
        parts.append(text)
        size += n
    return encode("".join(parts))


def split(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(training part, held-out tail): the last HOLDOUT of the corpus is held out."""
    cut = int(len(tokens) * (1 - HOLDOUT))
    return tokens[:cut], tokens[cut:]


def prompts(tokens: np.ndarray, n: int, length: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` prompts of ``length`` bytes (int64) from the held-out tail, each starting at a line
    start: a seeded random choice among the line starts, in corpus order."""
    tail = split(tokens)[1]
    starts = [i for i in range(len(tail) - length + 1) if i == 0 or tail[i - 1] == ord("\n")]
    if len(starts) < n:
        raise ValueError(f"the held-out tail has {len(starts)} line starts with {length} bytes after them, fewer than {n}")
    picked = np.sort(np.random.default_rng(seed).choice(starts, size=n, replace=False))
    return [tail[s : s + length].astype(np.int64) for s in picked]


# -- training -----------------------------------------------------------------------------


def _cache_path(name: str, tokens: np.ndarray) -> Path:
    key = json.dumps({"config": CONFIG.__dict__, "steps": STEPS, "train": TRAIN,
                      "corpus": hashlib.sha256(tokens.tobytes()).hexdigest()}, sort_keys=True, default=str)
    return CACHE / f"{name}_{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def _lr(step: int) -> float:
    """Linear warmup to TRAIN["lr"], then a cosine down to TRAIN["min_lr"] at STEPS."""
    if step < TRAIN["warmup"]:
        return TRAIN["lr"] * (step + 1) / TRAIN["warmup"]
    t = (step - TRAIN["warmup"]) / max(1, STEPS - TRAIN["warmup"])
    return TRAIN["min_lr"] + 0.5 * (TRAIN["lr"] - TRAIN["min_lr"]) * (1 + math.cos(math.pi * t))


def _loss(model: DecoderLM, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def train(name: str, tokens: np.ndarray) -> tuple[DecoderLM, float]:
    """A fresh DecoderLM trained STEPS steps on the training part; (model in eval mode, seconds)."""
    torch.set_num_threads(TRAIN_THREADS)
    torch.manual_seed(TRAIN["seed"])
    rng = np.random.default_rng(TRAIN["seed"])
    data = torch.from_numpy(split(tokens)[0].astype(np.int64))
    model = DecoderLM(CONFIG).train()
    # weight decay on the matrices (the tied embedding included), not on the norms
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": TRAIN["weight_decay"]}, {"params": other, "weight_decay": 0.0}],
                            lr=TRAIN["lr"], betas=TRAIN["betas"])
    window = TRAIN["seq"] + 1
    started, running = time.perf_counter(), []
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = _lr(step)
        starts = rng.integers(0, len(data) - window, size=TRAIN["batch"])
        loss = _loss(model, torch.stack([data[s : s + window] for s in starts]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN["clip"])
        opt.step()
        running.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == STEPS:
            log(f"[{name}] step {step + 1}/{STEPS}: loss {np.mean(running):.3f} nats/byte, {time.perf_counter() - started:.0f} s")
            running = []
    return model.eval(), time.perf_counter() - started


@torch.no_grad()
def heldout_loss(model: DecoderLM, tokens: np.ndarray) -> float:
    """Mean next-byte cross-entropy (nats/byte) over non-overlapping windows of the held-out tail."""
    tail = torch.from_numpy(split(tokens)[1].astype(np.int64))
    window = TRAIN["seq"] + 1
    n = min(EVAL_WINDOWS, len(tail) // window)
    batch = tail[: n * window].reshape(n, window)
    return sum(_loss(model, batch[i : i + 32]).item() * len(batch[i : i + 32]) for i in range(0, n, 32)) / n


def _model(name: str, tokens: np.ndarray) -> tuple[DecoderLM, dict[str, Any]]:
    path = _cache_path(name, tokens)
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        model = DecoderLM(CONFIG)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), {**json.loads(meta_path.read_text()), "weights": path.name, "cached": True}
    model, seconds = train(name, tokens)
    meta = {"corpus": name, "corpus_bytes": len(tokens), "params": count_params(model), "steps": STEPS,
            "heldout_loss": round(heldout_loss(model, tokens), 4), "train_seconds": round(seconds, 1),
            "train_threads": TRAIN_THREADS, "config": CONFIG.__dict__, "train": TRAIN}
    with fsio.atomic_path(path) as tmp:  # a temp file renamed into place: no reader sees half a file
        torch.save(model.state_dict(), tmp)
    fsio.write_json(meta_path, meta)  # written last: the weights are used only once both exist
    log(f"[{name}] held-out loss {meta['heldout_loss']:.3f} nats/byte; cached {path}")
    return model, {**meta, "weights": path.name, "cached": False}


def prose_model() -> tuple[DecoderLM, dict[str, Any]]:
    """The DecoderLM trained on the prose corpus (eval mode) and its info: params, steps,
    heldout_loss (nats/byte), train_seconds, cached (loaded rather than trained now), ..."""
    return _model("prose", prose_tokens())


def code_model() -> tuple[DecoderLM, dict[str, Any]]:
    """The DecoderLM trained on the code corpus (eval mode) and its info (as :func:`prose_model`)."""
    return _model("code", code_tokens())


def blockffn_model() -> tuple[torch.nn.Module, dict[str, Any]]:
    """The BlockFFN TinyLM of bench/blockffn_e2e.py (trained on the prose corpus through the
    pipeline and cached there; about 15 min the first time) and its moe.blockffn metrics."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import blockffn_e2e  # bench/ is not a package: found through sys.path

    _dense, sparse, metrics = blockffn_e2e.trained_models()
    return sparse.eval(), metrics
