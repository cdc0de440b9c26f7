"""The prunable structure of a transformer: which modules hold heads, FFN
neurons and hidden dimensions, how many parameters and FLOPs a given shape
costs, and the surgery that cuts units out of the weight matrices.

Two families are understood:

* ``bert``: BERT, RoBERTa, MiniLM and the other post-LayerNorm encoders with
  Hugging Face's BERT module names (``encoder.layer[i].attention.self.query``, ...);
* ``gpt2``: GPT-2 style decoders (``h[i].attn.c_attn``, ``Conv1D`` weights).

A *structure* is the JSON record of a pruned shape: the kept hidden width and,
per layer, the kept head and FFN counts. :func:`restructure` gives a fresh model
that shape, so a pruned model's weights load back into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgekit.errors import UserError


@dataclass
class LayerView:
    """One transformer layer's prunable parts (modules are live references)."""

    block: nn.Module
    heads: int
    ffn: int
    attn_out: nn.Module | None  # the projection after attention (input: heads x head_dim); None when cut
    ffn_out: nn.Module | None  # the FFN's second projection (input: FFN neurons); None when cut


class TransformerView:
    """A uniform view of a Hugging Face BERT-family or GPT-2 model."""

    def __init__(self, model: nn.Module):
        self.root = model
        self.hf = _unwrap(model)
        self.base, self.family = _find_base(self.hf)
        cfg = self.hf.config
        self.config = cfg
        self.full_hidden = int(cfg.hidden_size)
        self.head_dim = self.full_hidden // int(cfg.num_attention_heads)
        self.full_heads = int(cfg.num_attention_heads)
        self.full_ffn = int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * self.full_hidden)
        self.hidden = self._current_hidden()
        self.layers = [self._layer(b) for b in self._blocks()]

    # -- discovery -----------------------------------------------------------------
    def _blocks(self) -> list[nn.Module]:
        return list(self.base.encoder.layer) if self.family == "bert" else list(self.base.h)

    def _current_hidden(self) -> int:
        emb = self.base.embeddings.word_embeddings if self.family == "bert" else self.base.wte
        return int(emb.weight.shape[1])

    def _layer(self, block: nn.Module) -> LayerView:
        if self.family == "bert":
            attn_out = None if isinstance(block.attention, SkippedBertAttention) else block.attention.output.dense
            ffn_out = None if isinstance(block.output, SkippedBertOutput) else block.output.dense
        else:
            attn_out = None if isinstance(block.attn, SkippedGPT2Attention) else block.attn.c_proj
            ffn_out = None if isinstance(block.mlp, SkippedGPT2MLP) else block.mlp.c_proj
        heads = _in_features(attn_out) // self.head_dim if attn_out is not None else 0
        ffn = _in_features(ffn_out) if ffn_out is not None else 0
        return LayerView(block=block, heads=heads, ffn=ffn, attn_out=attn_out, ffn_out=ffn_out)

    def shape(self) -> dict[str, Any]:
        """This model's structure record."""
        return {
            "family": self.family,
            "hidden": self.hidden,
            "layers": [{"heads": lv.heads, "ffn": lv.ffn} for lv in self.layers],
        }

    def hidden_norms(self) -> list[tuple[nn.Module, str]]:
        """(parent, attribute) of every LayerNorm over the hidden dimension."""
        found = []
        if self.family == "bert":
            found.append((self.base.embeddings, "LayerNorm"))
            for b in self._blocks():
                found.append((b.attention.output if not isinstance(b.attention, SkippedBertAttention) else b.attention, "LayerNorm"))
                found.append((b.output, "LayerNorm"))
        else:
            for b in self._blocks():
                found += [(b, "ln_1"), (b, "ln_2")]
            found.append((self.base, "ln_f"))
        return found

    def embedding_modules(self) -> list[nn.Module]:
        """Modules whose outputs enter the residual stream before the first layer."""
        if self.family == "bert":
            return [self.base.embeddings]
        return [self.base.wte, self.base.wpe]

    def outputs_hidden(self) -> bool:
        """Whether the model's output is the hidden state itself (cutting hidden dims changes its width)."""
        return self.hf is self.base

    def head_inputs(self) -> list[tuple[nn.Module, str]] | None:
        """(parent, attribute) of each Linear that reads the last hidden state, whose input columns
        follow the hidden dims; None when the model has a head whose layout is unknown here."""
        found: list[tuple[nn.Module, str]] = []
        pooler = getattr(self.base, "pooler", None) if self.family == "bert" else None
        if pooler is not None:
            found.append((pooler, "dense"))
        if self.hf is self.base:
            return found
        for name, child in self.hf.named_children():
            if child is self.base or isinstance(child, nn.Dropout):
                continue
            if name in ("lm_head", "score", "qa_outputs") and isinstance(child, nn.Linear):
                found.append((self.hf, name))
            elif name == "classifier" and isinstance(child, nn.Linear):
                if pooler is None:  # with a pooler, the classifier reads the pooler's output instead
                    found.append((self.hf, name))
            elif name == "classifier" and isinstance(getattr(child, "dense", None), nn.Linear):
                found.append((child, "dense"))  # RoBERTa's head: dense -> tanh -> out_proj
            else:
                return None
        return found

    def unknown_heads(self) -> list[str]:
        known = {"lm_head", "score", "qa_outputs", "classifier"}
        if self.hf is self.base:
            return []
        return [n for n, c in self.hf.named_children() if c is not self.base and not isinstance(c, nn.Dropout) and n not in known]


# -- sizes -------------------------------------------------------------------------

def layer_params(heads: float, ffn: float, hidden: float, head_dim: int, attn_alive: bool = True, ffn_alive: bool = True) -> float:
    """Parameters of one layer with this shape (LayerNorms included; soft counts allowed)."""
    inner = heads * head_dim
    attn = (3 * (hidden * inner + inner) + inner * hidden + hidden) if attn_alive else 0.0
    mlp = (hidden * ffn + ffn + ffn * hidden + hidden) if ffn_alive else 0.0
    return attn + mlp + 4 * hidden


def layer_flops(heads: float, ffn: float, hidden: float, head_dim: int, seq: int, attn_alive: bool = True, ffn_alive: bool = True) -> float:
    """Multiply-add FLOPs (2 per MAC) of one layer on one sequence of ``seq`` tokens."""
    inner = heads * head_dim
    attn = (2 * seq * 4 * hidden * inner + 2 * 2 * seq * seq * inner) if attn_alive else 0.0
    mlp = (2 * seq * 2 * hidden * ffn) if ffn_alive else 0.0
    return attn + mlp


def structure_params(shape: dict[str, Any], head_dim: int) -> int:
    """Encoder (transformer-layer) parameters of a structure record."""
    h = shape["hidden"]
    return int(sum(layer_params(L["heads"], L["ffn"], h, head_dim, L["heads"] > 0, L["ffn"] > 0) for L in shape["layers"]))


def structure_flops(shape: dict[str, Any], head_dim: int, seq: int) -> int:
    h = shape["hidden"]
    return int(sum(layer_flops(L["heads"], L["ffn"], h, head_dim, seq, L["heads"] > 0, L["ffn"] > 0) for L in shape["layers"]))


def encoder_param_count(model: nn.Module) -> int:
    """Parameters the transformer layers really hold (counted on the modules)."""
    view = TransformerView(model)
    return sum(p.numel() for b in view._blocks() for p in b.parameters())


# -- surgery -----------------------------------------------------------------------

@dataclass
class Keep:
    """Indices of the units to keep, and the scale each kept unit carries (mu)."""

    hidden: torch.Tensor | None  # None: all hidden dims stay
    heads: list[torch.Tensor]
    ffn: list[torch.Tensor]
    hidden_scale: torch.Tensor | None = None
    head_scale: list[torch.Tensor] | None = None
    ffn_scale: list[torch.Tensor] | None = None


@torch.no_grad()
def cut(model: nn.Module, keep: Keep) -> nn.Module:
    """Cut the units ``keep`` leaves out of ``model`` in place, folding the kept units' scales
    into the weights; sublayers left without heads or neurons are replaced whole."""
    view = TransformerView(model)
    if len(keep.heads) != len(view.layers) or len(keep.ffn) != len(view.layers):
        raise ValueError(f"keep lists {len(keep.heads)} / {len(keep.ffn)} layers, the model has {len(view.layers)}")
    hid = keep.hidden
    tied = _tied(view.hf)
    for i, lv in enumerate(view.layers):
        hs = keep.head_scale[i] if keep.head_scale else None
        fs = keep.ffn_scale[i] if keep.ffn_scale else None
        if view.family == "bert":
            _cut_bert_layer(lv, keep.heads[i], keep.ffn[i], hid, view.head_dim, hs, fs, keep.hidden_scale)
        else:
            _cut_gpt2_layer(lv, keep.heads[i], keep.ffn[i], hid, view.head_dim, hs, fs, keep.hidden_scale, i)
    if hid is not None:
        _cut_embeddings_and_head(view, hid, keep.hidden_scale, tied)
    return model


def restructure(model: nn.Module, structure: dict[str, Any]) -> nn.Module:
    """Give a full-size model the shape a structure record describes (weights are placeholders
    until a pruned state dict is loaded)."""
    view = TransformerView(model)
    if structure.get("family") != view.family or len(structure["layers"]) != len(view.layers):
        raise UserError(
            f"the pruned structure ({structure.get('family')}, {len(structure['layers'])} layers) does not fit this "
            f"{view.family} model with {len(view.layers)} layers; rebuild from the model the pruning started from"
        )
    hidden = None if structure["hidden"] == view.hidden else torch.arange(structure["hidden"])
    keep = Keep(
        hidden=hidden,
        heads=[torch.arange(L["heads"]) for L in structure["layers"]],
        ffn=[torch.arange(L["ffn"]) for L in structure["layers"]],
    )
    return cut(model, keep)


def _cut_bert_layer(lv: LayerView, heads, ffn, hid, head_dim, head_scale, ffn_scale, hidden_scale) -> None:
    block = lv.block
    if lv.attn_out is not None:
        if len(heads) == 0:
            block.attention = SkippedBertAttention(block.attention.output.LayerNorm)
        else:
            rows = _head_rows(heads, head_dim)
            sa = block.attention.self
            for name in ("query", "key", "value"):
                setattr(sa, name, _slice_linear(getattr(sa, name), out_idx=rows, in_idx=hid))
            sa.num_attention_heads = len(heads)
            sa.all_head_size = len(heads) * head_dim
            col_scale = head_scale.repeat_interleave(head_dim) if head_scale is not None else None
            block.attention.output.dense = _slice_linear(
                lv.attn_out, out_idx=hid, in_idx=rows, in_scale=col_scale, out_scale=hidden_scale
            )
    attn_norm_parent = block.attention if isinstance(block.attention, SkippedBertAttention) else block.attention.output
    if hid is not None:
        attn_norm_parent.LayerNorm = _slice_norm(attn_norm_parent.LayerNorm, hid)
    if lv.ffn_out is not None:
        if len(ffn) == 0:
            block.intermediate = SkippedBertIntermediate()
            block.output = SkippedBertOutput(block.output.LayerNorm)
        else:
            block.intermediate.dense = _slice_linear(block.intermediate.dense, out_idx=ffn, in_idx=hid)
            block.output.dense = _slice_linear(lv.ffn_out, out_idx=hid, in_idx=ffn, in_scale=ffn_scale, out_scale=hidden_scale)
    if hid is not None:
        block.output.LayerNorm = _slice_norm(block.output.LayerNorm, hid)


def _cut_gpt2_layer(lv: LayerView, heads, ffn, hid, head_dim, head_scale, ffn_scale, hidden_scale, index: int) -> None:
    block = lv.block
    if lv.attn_out is not None:
        if len(heads) == 0:
            block.attn = SkippedGPT2Attention(index)
        else:
            attn = block.attn
            n_full = _out_features(attn.c_attn) // (3 * head_dim)
            rows = _head_rows(heads, head_dim)
            qkv = torch.cat([rows + part * n_full * head_dim for part in range(3)])
            attn.c_attn = _slice_linear(attn.c_attn, out_idx=qkv, in_idx=hid)
            col_scale = head_scale.repeat_interleave(head_dim) if head_scale is not None else None
            attn.c_proj = _slice_linear(lv.attn_out, out_idx=hid, in_idx=rows, in_scale=col_scale, out_scale=hidden_scale)
            attn.num_heads = len(heads)
            attn.split_size = len(heads) * head_dim
    if lv.ffn_out is not None:
        if len(ffn) == 0:
            block.mlp = SkippedGPT2MLP()
        else:
            block.mlp.c_fc = _slice_linear(block.mlp.c_fc, out_idx=ffn, in_idx=hid)
            block.mlp.c_proj = _slice_linear(lv.ffn_out, out_idx=hid, in_idx=ffn, in_scale=ffn_scale, out_scale=hidden_scale)
    if hid is not None:
        block.ln_1 = _slice_norm(block.ln_1, hid)
        block.ln_2 = _slice_norm(block.ln_2, hid)


def _cut_embeddings_and_head(view: TransformerView, hid, scale, tied: bool) -> None:
    base = view.base
    if view.family == "bert":
        emb = base.embeddings
        for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
            if getattr(emb, name, None) is not None:
                setattr(emb, name, _slice_embedding(getattr(emb, name), hid))
        # the mask multiplies the embeddings' LayerNorm output, so its scale folds into gamma and beta
        emb.LayerNorm = _slice_norm(emb.LayerNorm, hid, scale)
    else:
        base.wte = _slice_embedding(base.wte, hid, scale)
        base.wpe = _slice_embedding(base.wpe, hid, scale)
        # a head tied to wte sees the scaled table: undo the scale on the final norm's output
        inverse = (1.0 / scale) if (scale is not None and tied) else None
        base.ln_f = _slice_norm(base.ln_f, hid, inverse)
    heads = view.head_inputs()
    if heads is None:
        raise UserError(f"cannot narrow the hidden width of a model with heads {', '.join(view.unknown_heads())}; set prune_hidden: false")
    for parent, attr in heads:
        layer = getattr(parent, attr)
        if tied and attr == "lm_head":
            emb = base.embeddings.word_embeddings if view.family == "bert" else base.wte
            new = nn.Linear(len(hid), layer.out_features, bias=layer.bias is not None)
            new.weight = emb.weight
            if layer.bias is not None:
                new.bias = layer.bias
            setattr(parent, attr, new)
        else:
            setattr(parent, attr, _slice_linear(layer, in_idx=hid))


# -- modules that stand in for a sublayer with nothing left -----------------------

class SkippedBertAttention(nn.Module):
    """A BERT attention block with no heads: the residual through its LayerNorm."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.LayerNorm = norm

    def forward(self, hidden_states, *args, **kwargs):
        return self.LayerNorm(hidden_states), None


class SkippedBertIntermediate(nn.Module):
    """A BERT FFN with no neurons computes nothing; its output block uses the residual only."""

    def forward(self, hidden_states):
        return hidden_states


class SkippedBertOutput(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.LayerNorm = norm

    def forward(self, intermediate, input_tensor):
        return self.LayerNorm(input_tensor)


class SkippedGPT2Attention(nn.Module):
    """A GPT-2 attention block with no heads adds nothing to the residual stream. It still
    records zero-head keys in the cache, so the cache's sequence length stays right."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states, cache=None, *args, **kwargs):
        if cache is not None:
            b, t = hidden_states.shape[:2]
            empty = hidden_states.new_zeros(b, 0, t, 1)
            target = getattr(cache, "self_attention_cache", cache)
            target.update(empty, empty, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class SkippedGPT2MLP(nn.Module):
    def forward(self, hidden_states):
        return torch.zeros_like(hidden_states)


# -- helpers -----------------------------------------------------------------------

def _unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside edgekit's encoder wrapper, or the model itself."""
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and hasattr(inner, "config"):
        return inner
    if not hasattr(model, "config"):
        raise UserError(
            f"prune.vib works on Hugging Face transformers models (BERT family or GPT-2), not on {type(model).__name__}; "
            "load the model with an hf: source"
        )
    return model


def _find_base(hf: nn.Module) -> tuple[nn.Module, str]:
    candidates = [hf] + [getattr(hf, n) for n in ("bert", "roberta", "transformer", "model", "encoder_model") if isinstance(getattr(hf, n, None), nn.Module)]
    for base in candidates:
        layers = getattr(getattr(base, "encoder", None), "layer", None)
        if layers is not None and len(layers) and hasattr(layers[0], "attention") and hasattr(base, "embeddings"):
            return base, "bert"
        if hasattr(base, "h") and hasattr(base, "wte") and len(base.h) and hasattr(base.h[0], "mlp"):
            return base, "gpt2"
    kind = getattr(getattr(hf, "config", None), "model_type", type(hf).__name__)
    raise UserError(
        f"prune.vib does not know the layout of {kind!r} models; it prunes BERT-family encoders "
        "(bert, roberta, MiniLM) and GPT-2 style decoders"
    )


def _lm_head(hf: nn.Module):
    head = getattr(hf, "lm_head", None)
    return head if isinstance(head, nn.Linear) else None


def _tied(hf: nn.Module) -> bool:
    head = _lm_head(hf)
    if head is None:
        return False
    emb = hf.get_input_embeddings()
    return emb is not None and head.weight is emb.weight


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    heads = torch.as_tensor(heads, dtype=torch.long)
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D"  # transformers' GPT-2 projection: weight is [in, out]


def _in_features(m: nn.Module) -> int:
    return int(m.weight.shape[0] if _is_conv1d(m) else m.weight.shape[1])


def _out_features(m: nn.Module) -> int:
    return int(m.weight.shape[1] if _is_conv1d(m) else m.weight.shape[0])


def _slice_linear(m: nn.Module, out_idx=None, in_idx=None, in_scale=None, out_scale=None) -> nn.Module:
    """A copy of a Linear (or GPT-2 Conv1D) keeping rows/columns, with input units scaled by
    ``in_scale`` and output units by ``out_scale`` (bias included)."""
    w = m.weight.detach()
    if _is_conv1d(m):
        w = w.t()  # work in [out, in]
    b = m.bias.detach() if m.bias is not None else None
    if in_idx is not None:
        w = w[:, in_idx]
    if in_scale is not None:
        w = w * in_scale[None, :]
    if out_idx is not None:
        w = w[out_idx]
        b = b[out_idx] if b is not None else None
    if out_scale is not None:
        w = w * out_scale[:, None]
        b = b * out_scale if b is not None else None
    if _is_conv1d(m):
        new = type(m)(w.shape[0], w.shape[1])
        new.weight = nn.Parameter(w.t().contiguous().clone())
        new.bias = nn.Parameter(b.clone())
        return new
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    new.weight = nn.Parameter(w.contiguous().clone())
    if b is not None:
        new.bias = nn.Parameter(b.clone())
    return new


def _slice_embedding(emb: nn.Embedding, hid, scale=None) -> nn.Embedding:
    w = emb.weight.detach()[:, hid]
    if scale is not None:
        w = w * scale[None, :]
    new = nn.Embedding(w.shape[0], w.shape[1], padding_idx=emb.padding_idx)
    new.weight = nn.Parameter(w.contiguous().clone())
    return new


def _slice_norm(norm: nn.Module, hid, scale=None) -> nn.LayerNorm:
    """A LayerNorm over the kept dims, its affine output scaled by ``scale``."""
    base = getattr(norm, "norm", norm)  # unwrap a MaskedLayerNorm
    w = base.weight.detach()[hid]
    b = base.bias.detach()[hid] if base.bias is not None else None
    if scale is not None:
        w = w * scale
        b = b * scale if b is not None else None
    new = nn.LayerNorm(len(w), eps=base.eps, bias=b is not None)
    new.weight = nn.Parameter(w.clone())
    if b is not None:
        new.bias = nn.Parameter(b.clone())
    return new
