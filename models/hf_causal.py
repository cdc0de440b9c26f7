"""Hugging Face causal LMs of the Llama family as edgekit :class:`DecoderLM` teachers.

Llama, Mistral and Qwen2 checkpoints share one layout (pre-RMSNorm, grouped-query
attention with rotary positions, SwiGLU); their weights copy name for name into
:class:`DecoderLM`, which then exports with a key/value cache and distils with
``distill.encdec``. Anything the copy would get wrong (another activation, scaled
or partial rotary embeddings, sliding windows, extra norms) is refused by name.
"""

from __future__ import annotations

from pathlib import Path

from edgekit.errors import UserError
from edgekit.models.encdec import DecoderLM, LMConfig

SUPPORTED = ("llama", "mistral", "qwen2")


def is_causal_lm_folder(path: Path) -> bool:
    import json

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return any(str(a).endswith("ForCausalLM") for a in config.get("architectures") or [])


def config_from_hf(config) -> LMConfig:
    """The :class:`LMConfig` of a transformers config, or a UserError naming what is not supported."""
    kind = getattr(config, "model_type", "?")
    if kind not in SUPPORTED:
        raise UserError(f"a {kind} causal LM cannot become an edgekit DecoderLM yet (supported: {', '.join(SUPPORTED)}); use a Llama, Mistral or Qwen2 checkpoint")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise UserError(f"this {kind} model uses the {act} activation; edgekit's DecoderLM has SwiGLU (silu) FFNs only")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        raise UserError(f"this {kind} model scales its rotary embeddings ({rope_type}); only plain rotary embeddings are supported")
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    theta = float(theta or getattr(config, "rope_theta", 10000.0) or 10000.0)
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        raise UserError(f"this {kind} model uses sliding-window attention, which DecoderLM does not implement")
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", 0) or config.hidden_size // heads)
    bias = bool(getattr(config, "attention_bias", kind == "qwen2"))
    if getattr(config, "mlp_bias", False):
        raise UserError(f"this {kind} model has FFN biases, which DecoderLM does not implement")
    return LMConfig(
        vocab=int(config.vocab_size),
        dim=int(config.hidden_size),
        heads=heads,
        kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        ffn=int(config.intermediate_size),
        layers=int(config.num_hidden_layers),
        head_dim=head_dim if head_dim * heads != config.hidden_size else 0,
        rope_theta=theta,
        eps=float(getattr(config, "rms_norm_eps", 1e-6)),
        attention_bias=bias,
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        bos=int(_first(getattr(config, "bos_token_id", None), 1)),
        eos=int(_first(getattr(config, "eos_token_id", None), 2)),
        pad=int(_first(getattr(config, "pad_token_id", None), 0)),
    )


def _first(value, default: int) -> int:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return default if value is None else value


def decoder_from_hf(hf_model) -> DecoderLM:
    """A :class:`DecoderLM` with the weights of a transformers Llama-family ``*ForCausalLM``."""
    cfg = config_from_hf(hf_model.config)
    model = DecoderLM(cfg)
    state = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items() if "rotary_emb" not in k}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"the {hf_model.config.model_type} checkpoint does not map onto DecoderLM "
            f"(missing {', '.join(missing[:4]) or 'nothing'}; unexpected {', '.join(unexpected[:4]) or 'nothing'}); it is not a plain Llama-family model"
        )
    return model.eval()


def load_folder(path: Path) -> DecoderLM:
    """Load a causal LM folder offline and convert it."""
    try:
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype="float32")
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"model.source: cannot load a causal LM from {path} offline ({first}); check the folder holds config.json and weights") from None
    return decoder_from_hf(hf_model)
