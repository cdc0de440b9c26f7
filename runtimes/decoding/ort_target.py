"""The speculative-decoding target on ONNX Runtime: the graph ``export/decoding_onnx.py`` writes.

numpy and onnxruntime only (no torch, so it runs on a device without it). The cache is the
graph's ``present_*`` outputs, kept as numpy arrays and fed back as ``past_*``; rolling back
to the accepted path is a slice (a chain's prefix) or a gather (a tree's branch) of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import UserError
from edgekit.runtimes.decoding.target import Target, check_feed
from edgekit.runtimes.generation import _open, kv_names

META_FILE = "verifier.json"  # the names export/decoding_onnx.py writes (not imported: that module needs torch)
FIX = "re-export the model with edgekit.export.decoding_onnx.export_verifier"


class OrtTarget(Target):
    """A verifier export on ONNX Runtime, at batch 1; the contract is :class:`TorchTarget`'s."""

    def __init__(self, session: Any, meta: dict[str, Any], folder: Path):
        self.session, self.meta, self.folder = session, meta, folder
        # learned positions (TinyLM) end at max_len; rotary ones (DecoderLM) have no limit of their own
        self.max_len = int(meta["max_len"]) if meta.get("max_len") else None
        self.layers, self.vocab = int(meta["layers"]), int(meta["vocab"])
        self.kv_heads, self.head_dim, self.dim = int(meta["kv_heads"]), int(meta["head_dim"]), int(meta["dim"])
        self._past, self._present = kv_names("past", self.layers), kv_names("present", self.layers)
        self._weights: dict[str, np.ndarray] = {}
        self.reset()

    @classmethod
    def load(cls, folder: str | Path, threads: int | None = None) -> "OrtTarget":
        import onnxruntime as ort

        folder = Path(folder)
        path = folder / META_FILE
        if not path.is_file():
            raise UserError(f"{folder} holds no verifier export ({META_FILE} is missing); {FIX}")
        try:
            meta = json.loads(path.read_text())
            graph = folder / meta["files"]["graph"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path} is not a verifier description ({type(e).__name__}: {e}); {FIX}") from None
        if meta.get("kind") != "verifier":
            raise UserError(f"{path} describes a {meta.get('kind')!r} export, not a verifier; {FIX}")
        missing = [k for k in ("layers", "vocab", "kv_heads", "head_dim", "dim") if not isinstance(meta.get(k), int)]
        if missing:
            raise UserError(f"{path} lacks {', '.join(missing)}; {FIX}")
        if not graph.is_file():
            raise UserError(f"{graph} is missing; {FIX}")
        so = ort.SessionOptions()
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3  # errors only: a zero-length past (the prefill) is normal here
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        # ONNX Runtime's default thread spinning stays on: with it, plain and drafted decoding both ran
        # faster here (548 against 374 tokens/s plain on the code bench model, 2 threads), the drafter
        # working on the main thread while the pool's thread waits on the other core
        return cls(_open(ort, graph, so), meta, folder)

    def reset(self) -> None:
        self.cache: list[np.ndarray] | None = None  # flat: key_0, value_0, key_1, ...
        self.length = 0

    def forward(self, tokens, positions=None, tree_mask=None):
        ids, pos, mask = check_feed(tokens, positions, tree_mask, self.vocab, self.length)
        t = len(ids)
        if mask is None:
            mask = np.tril(np.ones((t, t), dtype=bool))
        past = self.cache
        if past is None:  # a zero-length cache: the prefill runs through the same graph
            past = [np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)] * len(self._past)
        feeds = {"input_ids": ids[None], "position_ids": pos, "tree_mask": mask, **dict(zip(self._past, past))}
        logits, hidden, *self.cache = self.session.run(["logits", "hidden", *self._present], feeds)
        self.length += t
        return logits[0], hidden[0]

    def keep(self, start, indices):
        idx = list(indices)
        if start > self.length or any(i < 0 or start + i >= self.length for i in idx):
            raise UserError(f"cannot keep tokens {idx} after {start} of a cache holding {self.length}")
        n = start + len(idx)
        if self.cache is None:  # nothing fed yet: the checks above allow only keep(0, [])
            return
        if idx == list(range(len(idx))):  # a prefix of the new block: a slice, no copy
            self.cache = [c[:, :, :n] for c in self.cache]
        else:
            sel = np.concatenate([np.arange(start), start + np.asarray(idx, dtype=np.int64)]).astype(np.int64)
            self.cache = [np.take(c, sel, axis=2) for c in self.cache]
        self.length = n

    def cache_arrays(self):
        if self.cache is None:
            return []
        return [(self.cache[i][0].copy(), self.cache[i + 1][0].copy()) for i in range(0, len(self.cache), 2)]

    def _weight(self, role: str) -> np.ndarray:
        if role not in self._weights:
            name = self.meta["files"].get(role)
            path = self.folder / name if name else None
            if path is None or not path.is_file():
                raise UserError(f"the verifier export in {self.folder} lacks its {role} weights; {FIX}")
            self._weights[role] = np.load(path, allow_pickle=False)
        return self._weights[role]

    def embedding(self) -> np.ndarray:
        """The token embedding matrix (vocab, dim)."""
        return self._weight("embedding")

    def head(self) -> np.ndarray:
        """The LM head's weight (vocab, dim): logits = hidden @ head().T (the embedding when tied)."""
        return self._weight("lm_head" if "lm_head" in self.meta["files"] else "embedding")
