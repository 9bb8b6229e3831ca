"""Adapters on a model, in and out: attach fresh ones to a loaded base, and merge them
back into plain weights.

A LoRA run's checkpoint stores its adapters and records where its base came from (the
role's model source) with the checksums of that base as the run held it (plain or
quantised); ``jalign.sources`` rebuilds the base from the source, refuses it when the
checksums differ, and puts the adapters on it with ``attach``.
"""

from __future__ import annotations

import jax
from flax import nnx, traverse_util

from jalign.models import lora as L
from jalign.models.build import abstract_model, params_of
from jalign.models.lora import LoraConfig


def _layers_dicts(flat_paths) -> set[tuple]:
    """Paths of the stacked-layer dicts (``.../layers``) in a flat parameter tree."""
    return {k[:-1] for k in flat_paths if k[-1] == "attn_norm"}


def attach(model, lora: LoraConfig, *, seed: int = 0, mesh=None, rules=None):
    """``model`` (plain) as the frozen base of fresh adapters: A random (seeded by
    ``seed``), B zero, so the result computes exactly what ``model`` does; its projection
    weights become codes when ``lora.quantize``. The returned model's config carries
    ``lora``. ``model``'s arrays are consumed (donated) where the platform allows. A base
    already holding codes (``load_hf(quantize=...)``) keeps them."""
    from jalign.sharding import DEFAULT_RULES
    rules = DEFAULT_RULES if rules is None else rules
    config = model.config.replace(lora=lora)
    graphdef, abstract = abstract_model(config, mesh, rules, type(model))
    target = traverse_util.flatten_dict(nnx.to_pure_dict(abstract))
    shardings = (None if mesh is None else
                 traverse_util.unflatten_dict({k: v.sharding for k, v in target.items()}))
    paths = sorted(target)
    flat_base = traverse_util.flatten_dict(params_of(model))
    layer_dicts = _layers_dicts(flat_base)

    def quantized(path):  # a float base weight to quantise (a base read as codes has none)
        return (bool(lora.quantize) and path[-1] in L.QUANTIZED_WEIGHTS
                and path[:-1] in layer_dicts
                and path[:-1] + (path[-1] + L.SCALE_SUFFIX,) not in flat_base)

    # Weights kept as they are are donated (the result reuses their buffers: no second copy
    # of the base while loading); weights to quantise are read, then freed with ``model``.
    kept = {k: v for k, v in flat_base.items() if not quantized(k)}
    to_quantize = {k: v for k, v in flat_base.items() if quantized(k)}

    def build(kept, to_quantize):
        key = jax.random.key(seed)
        out = {}
        for i, path in enumerate(paths):
            name, want = path[-1], target[path]
            if L.is_adapter(name):
                out[path] = L.init_adapter(jax.random.fold_in(key, i), name, want.shape, want.dtype)
            elif path in to_quantize:
                codes, scale = L.quantize_weight(to_quantize[path], name, lora.quantize,
                                                 lora.block_size)
                out[path], out[path[:-1] + (name + L.SCALE_SUFFIX,)] = codes, scale
            elif path in kept:
                out[path] = kept[path].astype(want.dtype)
        return traverse_util.unflatten_dict(out)

    params = jax.jit(build, out_shardings=shardings, donate_argnums=(0,))(kept, to_quantize)
    nnx.replace_by_pure_dict(abstract, params)
    return nnx.merge(graphdef, abstract)


def merged_params(params: dict, config) -> dict:
    """A plain model's parameters from an adapted one's: ``W + (alpha/rank) A B`` per
    adapted weight, quantised weights dequantised (to ``config.param_dtype``)."""
    flat = traverse_util.flatten_dict(params)
    out = {k: v for k, v in flat.items() if k[:-1] not in _layers_dicts(flat)}
    for prefix in _layers_dicts(flat):
        layers = {k[-1]: v for k, v in flat.items() if k[:-1] == prefix}
        for name, value in L.merged_layers(layers, config.lora, config.weight_dtype).items():
            out[prefix + (name,)] = value
    return traverse_util.unflatten_dict(out)


def merge(model):
    """The plain model an adapted ``model`` computes (adapters folded into the weights)."""
    config = model.config
    if config.lora is None:
        return model
    plain = config.replace(lora=None)
    graphdef, abstract = abstract_model(plain, model_cls=type(model))
    nnx.replace_by_pure_dict(abstract, jax.jit(merged_params, static_argnums=1)(
        params_of(model), config))
    return nnx.merge(graphdef, abstract)


def adapter_count(params: dict) -> int:
    """Number of adapter parameters (A and B entries) in a tree."""
    flat = traverse_util.flatten_dict(params)
    return sum(int(v.size) for k, v in flat.items() if L.is_adapter(str(k[-1])))
