"""Hugging Face ``config.json`` <-> LlamaConfig, for every model family
(``jalign.models.families``: ``model_type`` llama, qwen2, qwen3, mistral).

Reads both the transformers 5 layout (``rope_parameters``) and the older one
(``rope_theta`` + ``rope_scaling``). Anything jalign would silently compute differently
(another architecture, activation, rope type or per-layer attention pattern) is refused
with its name. What a family adds to the shared fields is one reader and one writer
below (``FAMILY_OPTIONS``).

The family table (``jalign.models.families``) maps architectures to heads:
``LlamaForCausalLM`` has an ``lm`` head; ``LlamaForSequenceClassification`` with one
label a ``scalar`` head (reward or value model).
"""

from __future__ import annotations

from typing import Any

from jalign.convert.safetensors_io import ConversionError
from jalign.models.config import LlamaConfig, RopeScaling
from jalign.models.families import FAMILIES, family_for_hf, family_of
from jalign.models.heads import LM, SCALAR

SUPPORTED_ARCHITECTURES = tuple(a for f in FAMILIES.values() for a in f.hf_architectures)
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
    family = _family(hf)
    archs = hf.get("architectures") or [family.hf_architecture(LM)]
    heads = {family.hf_architectures[a] for a in archs if a in family.hf_architectures}
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


def _family(hf: dict):
    """The family that reads this config.json (by ``model_type`` and architectures)."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    family = family_for_hf(model_type)
    if family is None or (archs and not set(archs) & set(family.hf_architectures)):
        types = ", ".join(repr(t) for f in FAMILIES.values() for t in f.hf_model_types)
        raise ConversionError(
            f"config.json: unsupported architecture (model_type={model_type!r}, "
            f"architectures={archs}); jalign converts model types {types} with "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return family


def _full_attention_only(hf: dict, family: str) -> None:
    """Qwen's per-layer attention types: sliding-window layers are not supported."""
    types = set(hf.get("layer_types") or ())
    if hf.get("use_sliding_window") or types - {"full_attention"}:
        raise ConversionError(f"config.json: {family} with sliding-window layers "
                              f"(use_sliding_window={hf.get('use_sliding_window')}, layer_types "
                              f"{sorted(types)}) is not supported; jalign's {family} attends "
                              "to the full context")


def _llama_options(hf: dict) -> dict:
    return {"attention_bias": bool(hf.get("attention_bias", False)),
            "mlp_bias": bool(hf.get("mlp_bias", False))}


def _qwen2_options(hf: dict) -> dict:
    _full_attention_only(hf, "qwen2")
    return {"qkv_bias": True}  # Qwen2's q/k/v projections always have biases (o none)


def _qwen3_options(hf: dict) -> dict:
    _full_attention_only(hf, "qwen3")
    return {"qk_norm": True, "attention_bias": bool(hf.get("attention_bias", False))}


def _mistral_options(hf: dict) -> dict:
    window = hf.get("sliding_window")
    return {"sliding_window": int(window) if window else None}


def _llama_fields(c) -> dict:
    return {"attention_bias": c.attention_bias, "mlp_bias": c.mlp_bias}


def _qwen_fields(c) -> dict:
    return {"use_sliding_window": False, "sliding_window": None,
            "max_window_layers": c.num_layers, "layer_types": ["full_attention"] * c.num_layers}


def _qwen3_fields(c) -> dict:
    return {**_qwen_fields(c), "attention_bias": c.attention_bias}


def _mistral_fields(c) -> dict:
    return {"sliding_window": c.sliding_window}


# family -> (config.json -> its LlamaConfig options, LlamaConfig -> its config.json keys)
FAMILY_OPTIONS = {"llama": (_llama_options, _llama_fields),
                  "qwen2": (_qwen2_options, _qwen_fields),
                  "qwen3": (_qwen3_options, _qwen3_fields),
                  "mistral": (_mistral_options, _mistral_fields)}
# The options each family can write; another one set is refused on export.
FAMILY_SUPPORTS = {"llama": {"attention_bias", "mlp_bias"}, "qwen2": {"qkv_bias"},
                   "qwen3": {"qk_norm", "attention_bias"}, "mistral": {"sliding_window"}}


def config_from_hf(hf: dict, **overrides: Any) -> LlamaConfig:
    family = _family(hf)
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
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"), family=family.name,
            **FAMILY_OPTIONS[family.name][0](hf))
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
    family = family_of(config)
    _check_exportable(config)
    eos = config.eos_token_id
    out = {
        "architectures": [family.hf_architecture(head)],
        "model_type": family.hf_model_types[0],
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
        "attention_dropout": 0.0,
        **FAMILY_OPTIONS[family.name][1](config),
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


def _check_exportable(config) -> None:
    """Every option the config sets is one its family's config.json can say."""
    options = {"attention_bias", "mlp_bias", "qkv_bias", "qk_norm", "sliding_window"}
    used = {o for o in options if getattr(config, o) not in (False, None)}
    extra = used - FAMILY_SUPPORTS[config.family]
    if extra:
        raise ConversionError(f"a {config.family} model has no Hugging Face config.json field for "
                              f"{sorted(extra)}: export it as a family that has them")


def generation_config_to_hf(config: LlamaConfig, tokenizer=None) -> dict:
    """generation_config.json: the config's special ids; generation also stops at the
    tokenizer's end-of-sequence token (what a chat template ends a turn with) if the
    config names another."""
    eos = config.eos_token_id
    eos = list(eos) if isinstance(eos, tuple) else eos
    end = getattr(tokenizer, "eos_token_id", None)
    if end is not None and end not in (eos if isinstance(eos, list) else [eos]):
        eos = [*(eos if isinstance(eos, list) else [] if eos is None else [eos]), end]
    out = {"bos_token_id": config.bos_token_id, "eos_token_id": eos}
    if config.pad_token_id is not None:
        out["pad_token_id"] = config.pad_token_id
    return out
