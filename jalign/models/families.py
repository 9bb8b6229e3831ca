"""Model families: the one table that says which architectures jalign builds.

A family names its config class, its causal-LM module, the Hugging Face ``model_type``
values and architecture class names it reads and writes (each architecture with the head
it has: ``lm`` next-token logits, ``scalar`` one score per sequence) and its tensor map
(HF tensor names <-> jalign parameter paths). Everything outside ``jalign.models`` and
``jalign.convert`` goes through this table and never names a family: adding one (Qwen,
Mistral) is an entry here plus its own files.
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


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", LlamaConfig, Llama, ("llama",),
                    {"LlamaForCausalLM": "lm", "LlamaForSequenceClassification": "scalar"},
                    llama_tensor_maps, layer_shapes, layer_axes, (LlamaConfig, RopeScaling)),
}
DEFAULT_FAMILY = "llama"


def family_of(config) -> Family:
    """The family of a model config (by its class)."""
    for family in FAMILIES.values():
        if type(config) is family.config_class:
            return family
    raise TypeError(f"{type(config).__name__} is not the config class of a model family; "
                    f"known: {[f.config_class.__name__ for f in FAMILIES.values()]}")


def family_for_hf(model_type) -> Family | None:
    """The family that reads config.json's ``model_type`` (None: no family does)."""
    return next((f for f in FAMILIES.values() if model_type in f.hf_model_types), None)


def config_classes() -> tuple[type, ...]:
    """Every family's gin-bindable config classes."""
    return tuple(c for f in FAMILIES.values() for c in (f.gin_classes or (f.config_class,)))


def default_config_class() -> type:
    return FAMILIES[DEFAULT_FAMILY].config_class


def config_from_dict(d: dict):
    """A model config from its JSON form (``to_dict``); ``family`` names the family (configs
    written before families existed are the default family's)."""
    d = dict(d)
    name = d.pop("family", DEFAULT_FAMILY)
    if name not in FAMILIES:
        raise ValueError(f"model config of unknown family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name].config_class.from_dict(d)


def config_to_dict(config) -> dict:
    """``config.to_dict()`` with its family named (read back by ``config_from_dict``)."""
    out = config.to_dict()
    family = family_of(config).name
    if family != DEFAULT_FAMILY:  # the default stays implicit: older readers know it
        out["family"] = family
    return out


ARCHITECTURE_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                       "intermediate_size", "vocab_size", "resolved_head_dim")


def architecture_differences(have, want) -> list[str]:
    """'field: have vs want' for every shape-deciding field in which two configs differ
    (another family is a difference too)."""
    if type(have) is not type(want):
        return [f"family: {family_of(have).name} vs {family_of(want).name}"]
    return [f"{f}: {getattr(have, f)} vs {getattr(want, f)}" for f in ARCHITECTURE_FIELDS
            if getattr(have, f) != getattr(want, f)]
