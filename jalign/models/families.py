"""Model families: the one table that says which architectures jalign builds.

A family names its config class, its causal-LM module, the Hugging Face ``model_type``
values and architecture class names it reads and writes (each architecture with the head
it has: ``lm`` next-token logits, ``scalar`` one score per sequence) and its tensor map
(HF tensor names <-> jalign parameter paths). Everything outside ``jalign.models`` and
``jalign.convert`` goes through this table and never names a family.

The families here are one decoder (``jalign.models.llama``) with options that say what
differs (``LlamaConfig.qkv_bias``, ``qk_norm``, ``sliding_window``); a config names its
family in ``LlamaConfig.family``. Their config.json readers and writers are
``jalign.convert.hf_config``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

from jalign.models.config import LlamaConfig, RopeScaling
from jalign.models.llama import Llama, layer_axes, layer_shapes
from jalign.models.llama_hf import tensor_maps as llama_tensor_maps


class ModelConfig(Protocol):
    """What code outside the models reads of any family's config (for type hints)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    dtype: str
    param_dtype: str
    lora: Any

    @property
    def resolved_head_dim(self) -> int: ...
    def replace(self, **changes: Any) -> "ModelConfig": ...
    def num_params(self) -> int: ...
    def to_dict(self) -> dict: ...


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    config_class: type
    lm_class: type                       # the causal LM (NNX module taking the config)
    hf_model_types: tuple[str, ...]      # config.json "model_type" values it reads
    hf_architectures: dict[str, str]     # HF class name -> head ("lm" / "scalar")
    tensor_maps: Callable                # (config, prefix="model.", *, lm_head=True) -> [TensorMap]
    layer_shapes: Callable               # config -> {param: shape of one layer's}
    layer_axes: Callable                 # config -> {param: logical axes of one layer's}
    gin_classes: tuple = ()              # config dataclasses gin may bind (the config's parts)

    def hf_architecture(self, head: str) -> str:
        return next(a for a, h in self.hf_architectures.items() if h == head)


def _decoder(name: str, hf_type: str, hf_prefix: str) -> Family:
    """A family of the one decoder: its HF model type and ``<Prefix>ForCausalLM`` /
    ``<Prefix>ForSequenceClassification`` architectures."""
    return Family(name, LlamaConfig, Llama, (hf_type,),
                  {f"{hf_prefix}ForCausalLM": "lm", f"{hf_prefix}ForSequenceClassification": "scalar"},
                  llama_tensor_maps, layer_shapes, layer_axes, (LlamaConfig, RopeScaling))


FAMILIES: dict[str, Family] = {
    # Llama 2/3/3.1/3.2 and SmolLM (a Llama).
    "llama": _decoder("llama", "llama", "Llama"),
    # Qwen2 and Qwen2.5: biases on q, k and v.
    "qwen2": _decoder("qwen2", "qwen2", "Qwen2"),
    # Qwen3 (dense): RMSNorm on q and k per head, explicit head_dim.
    "qwen3": _decoder("qwen3", "qwen3", "Qwen3"),
    # Mistral 7B v0.1-v0.3: sliding-window attention where the config has a window.
    "mistral": _decoder("mistral", "mistral", "Mistral"),
}
DEFAULT_FAMILY = "llama"


def family_of(config) -> Family:
    """The family a model config names."""
    name = getattr(config, "family", None)
    if name not in FAMILIES:
        raise ValueError(f"{type(config).__name__}.family={name!r}; one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_for_hf(model_type) -> Family | None:
    """The family that reads config.json's ``model_type`` (None: no family does)."""
    return next((f for f in FAMILIES.values() if model_type in f.hf_model_types), None)


def config_classes() -> tuple[type, ...]:
    """Every family's gin-bindable config classes (each once)."""
    return tuple(dict.fromkeys(c for f in FAMILIES.values()
                               for c in (f.gin_classes or (f.config_class,))))


def default_config_class() -> type:
    return FAMILIES[DEFAULT_FAMILY].config_class


def config_from_dict(d: dict):
    """A model config from its JSON form (``to_dict``); ``family`` names the family (configs
    written before families existed are the default family's)."""
    name = d.get("family", DEFAULT_FAMILY)
    if name not in FAMILIES:
        raise ValueError(f"model config of unknown family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name].config_class.from_dict(d)


def config_to_dict(config) -> dict:
    """``config.to_dict()`` (it names its family; read back by ``config_from_dict``)."""
    return config.to_dict()


ARCHITECTURE_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                       "intermediate_size", "vocab_size", "resolved_head_dim",
                       "attention_bias", "mlp_bias", "qkv_bias", "qk_norm")


def architecture_differences(have, want) -> list[str]:
    """'field: have vs want' for every shape-deciding field in which two configs differ
    (another family is a difference too)."""
    if type(have) is not type(want) or have.family != want.family:
        return [f"family: {have.family} vs {want.family}"]
    return [f"{f}: {getattr(have, f)} vs {getattr(want, f)}" for f in ARCHITECTURE_FIELDS
            if getattr(have, f) != getattr(want, f)]
