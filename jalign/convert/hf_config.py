"""Hugging Face ``config.json`` <-> LlamaConfig.

Reads both the transformers 5 layout (``rope_parameters``) and the older one
(``rope_theta`` + ``rope_scaling``). Anything jalign would silently compute differently
(another architecture, activation or rope type) is refused with its name.

The family table (``jalign.models.families``) maps architectures to heads:
``LlamaForCausalLM`` has an ``lm`` head; ``LlamaForSequenceClassification`` with one
label a ``scalar`` head (reward or value model).
"""

from __future__ import annotations

from typing import Any

from jalign.convert.safetensors_io import ConversionError
from jalign.models.config import LlamaConfig, RopeScaling
from jalign.models.families import FAMILIES
from jalign.models.heads import LM, SCALAR

LLAMA = FAMILIES["llama"]
ARCHITECTURE_HEADS = LLAMA.hf_architectures
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURE_HEADS)
# transformers' PretrainedConfig default when config.json names no labels.
HF_DEFAULT_NUM_LABELS = 2
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def _rope_from_hf(hf: dict) -> tuple[float, RopeScaling | None]:
    params = hf.get("rope_parameters")
    if params is None:
        params = dict(hf.get("rope_scaling") or {})
        if "rope_theta" in hf:
            params.setdefault("rope_theta", hf["rope_theta"])
    params = dict(params)
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConversionError(f"config.json: unsupported rope type {rope_type!r} "
                              f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if rope_type == "default":
        return theta, None
    try:
        factor = float(params["factor"])
        if rope_type == "linear":
            return theta, RopeScaling("linear", factor)
        return theta, RopeScaling(
            "llama3", factor, float(params["low_freq_factor"]), float(params["high_freq_factor"]),
            int(params["original_max_position_embeddings"]))
    except KeyError as e:
        raise ConversionError(f"config.json: rope type {rope_type!r} needs {e.args[0]!r}") from None


def num_labels(hf: dict) -> int:
    """The label count transformers would build: id2label wins over num_labels (as in
    ``PretrainedConfig``); neither means the library default, 2."""
    if hf.get("id2label") is not None:
        return len(hf["id2label"])
    return int(hf.get("num_labels", HF_DEFAULT_NUM_LABELS))


def checkpoint_head(hf: dict) -> str:
    """The head of the model a config.json describes: ``lm`` or ``scalar``.

    Configs without ``architectures`` (some older exports) are taken as causal LMs; the
    tensor check then reports a stray ``score.weight`` by name.
    """
    _check_architecture(hf)
    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    heads = {ARCHITECTURE_HEADS[a] for a in archs if a in ARCHITECTURE_HEADS}
    if len(heads) != 1:
        raise ConversionError(f"config.json: architectures={archs} names both a causal LM and "
                              "a classifier; expected exactly one")
    head = heads.pop()
    if head == SCALAR and num_labels(hf) != 1:
        n = num_labels(hf)
        raise ConversionError(
            f"config.json: LlamaForSequenceClassification with num_labels={n} (score.weight "
            f"[{n}, hidden]); jalign's scalar head (reward/value model) has exactly one output, "
            "num_labels=1")
    return head


def _check_architecture(hf: dict) -> None:
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if model_type not in LLAMA.hf_model_types or (archs and not set(archs) & set(SUPPORTED_ARCHITECTURES)):
        raise ConversionError(
            f"config.json: unsupported architecture (model_type={model_type!r}, "
            f"architectures={archs}); jalign converts model_type 'llama' with "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}")


def config_from_hf(hf: dict, **overrides: Any) -> LlamaConfig:
    _check_architecture(hf)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"config.json: unsupported hidden_act {act!r} (Llama uses 'silu')")
    try:
        theta, scaling = _rope_from_hf(hf)
        heads = int(hf["num_attention_heads"])
        fields = dict(
            vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=hf.get("head_dim"), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"))
    except KeyError as e:
        raise ConversionError(f"config.json: missing required field {e.args[0]!r}") from None
    fields.update(overrides)
    try:
        return LlamaConfig(**fields)
    except ValueError as e:
        raise ConversionError(f"config.json: {e}") from None


def config_to_hf(config: LlamaConfig, dtype: str, head: str = LM) -> dict:
    """config.json for a model with ``head`` (``lm`` or ``scalar``).

    A scalar head is written as ``LlamaForSequenceClassification`` with one label.
    transformers finds each row's last token as the rightmost one that is not
    ``pad_token_id`` (and refuses batches > 1 without one), so the caller should set it.
    """
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        s = config.rope_scaling
        rope.update(rope_type=s.rope_type, factor=s.factor)
        if s.rope_type == "llama3":
            rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                        original_max_position_embeddings=s.original_max_position_embeddings)
    eos = config.eos_token_id
    out = {
        "architectures": [LLAMA.hf_architecture(head)],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.resolved_head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": rope,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "attention_dropout": 0.0,
        "mlp_bias": config.mlp_bias,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
        "pad_token_id": config.pad_token_id,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": dtype,
    }
    if head == SCALAR:
        out.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return out


def generation_config_to_hf(config: LlamaConfig) -> dict:
    eos = config.eos_token_id
    out = {"bos_token_id": config.bos_token_id,
           "eos_token_id": list(eos) if isinstance(eos, tuple) else eos}
    if config.pad_token_id is not None:
        out["pad_token_id"] = config.pad_token_id
    return out
