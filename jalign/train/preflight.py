"""Checks a run makes before it loads a model or compiles anything.

Every problem knowable at start (a batch the mesh cannot split, a data format the
algorithm cannot train on, a missing split or file, a tokenizer the model's vocabulary
cannot hold) is a one-line ``ConfigError`` naming the binding to change, instead of a
traceback after the first eval or a silently replicated batch.
"""

from __future__ import annotations

import math

import numpy as np

from jax.sharding import Mesh

from jalign.errors import ConfigError
from jalign.data.formats import DataError
from jalign.data.pipeline import DataConfig, FieldError, build_iterator
from jalign.sharding import DEFAULT_RULES, Rules, _lookup


def batch_axes_size(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> tuple[int, str]:
    """(devices the batch dimension is split over, e.g. 'data=1 x fsdp=8')."""
    axes = _lookup(rules, "batch")
    size = math.prod(mesh.shape[a] for a in axes)
    return size, " x ".join(f"{a}={mesh.shape[a]}" for a in axes) or "none"


def check_batch_blocks(mesh, rules: Rules = DEFAULT_RULES) -> None:
    """Each block of batch rows lives on the devices of one process. Each process hands
    its own rows to ``jax.make_array_from_process_local_data``; a block spread over two
    processes (tensor-parallel devices on different hosts) would get rows from both.
    ``mesh`` needs ``devices`` (with ``process_index``) and ``axis_names``."""
    names = list(mesh.axis_names)
    batch = [names.index(a) for a in _lookup(rules, "batch")]
    rest = [i for i in range(len(names)) if i not in batch]
    blocks = np.transpose(mesh.devices, batch + rest).reshape(
        math.prod(mesh.devices.shape[i] for i in batch), -1)
    for index, block in enumerate(blocks):
        owners = sorted({d.process_index for d in block})
        if len(owners) > 1:
            raise ConfigError(
                f"MeshConfig: batch block {index} (one of {len(blocks)} over "
                f"{' x '.join(names[i] for i in batch)}) is held by devices of processes "
                f"{owners}: each process reads its own rows, so a block must sit inside one "
                f"host; make the non-batch axes ({', '.join(names[i] for i in rest)}) fit "
                "inside a host, or use MeshConfig.dcn_* so the mesh is laid out per host")


def _multiples(n: int, near: int) -> str:
    below = (near // n) * n
    options = [m for m in (below, below + n) if m > 0]
    return " or ".join(str(m) for m in dict.fromkeys(options))


def check_batch_divides(mesh: Mesh, batch: int, binding: str, *, accum_steps: int = 1,
                        rules: Rules = DEFAULT_RULES, processes: int = 1) -> None:
    """The batch (and each of its ``accum_steps`` micro-batches) splits evenly over the
    mesh axes that hold the batch; otherwise XLA would replicate it (every device doing
    all the work) or, across hosts, assemble wrong global arrays."""
    n, axes = batch_axes_size(mesh, rules)
    if processes > 1 and n % processes:
        raise ConfigError(f"the mesh's batch axes ({axes}) span {n} devices, fewer than the "
                          f"{processes} processes that each read their own rows: make "
                          "MeshConfig.data * MeshConfig.fsdp a multiple of the process count")
    if batch % processes:
        raise ConfigError(f"{binding}={batch} is not divisible by the {processes} processes; "
                          f"use {_multiples(processes, batch)}")
    if batch % n:
        raise ConfigError(
            f"{binding}={batch} does not split over the {n} devices that hold the batch "
            f"({axes}); use a multiple of {n} (e.g. {_multiples(n, batch)}) or change "
            "MeshConfig")
    if accum_steps > 1:
        if batch % accum_steps:
            raise ConfigError(f"{binding}={batch} is not divisible by "
                              f"TrainConfig.accum_steps={accum_steps}")
        micro = batch // accum_steps
        if micro % n:
            raise ConfigError(
                f"{binding}={batch} with TrainConfig.accum_steps={accum_steps} gives "
                f"micro-batches of {micro}, which do not split over the {n} devices that "
                f"hold the batch ({axes}); use a batch of {_multiples(n * accum_steps, batch)} "
                "or fewer accum_steps")


def check_data_kind(algorithm, config: DataConfig, binding: str) -> None:
    from jalign.data.formats import adapter
    kind, _ = adapter(config.format)
    if kind != algorithm.data_kind:
        raise ConfigError(f"{binding}.format={config.format!r} gives {kind} data, but "
                          f"TrainConfig.algorithm={algorithm.name.split('/')[0]!r} trains on "
                          f"{algorithm.data_kind} data")


def open_data(config: DataConfig, binding: str, **kwargs):
    """build_iterator with its errors named after the binding (``eval/DataConfig`` ...)."""
    try:
        return build_iterator(config, **kwargs)
    except FieldError as e:
        raise ConfigError(f"{binding}.{e.field}={e.value!r}: {e.message}") from None
    except DataError as e:
        raise ConfigError(f"{binding} (path={config.path!r}): {e}") from None


def check_vocab(iterator, vocab_size: int, binding: str) -> None:
    """Token ids the model's embedding cannot hold would be clamped silently by XLA."""
    top = iterator.stats.get("max_token_id", -1)
    if top >= vocab_size:
        raise ConfigError(
            f"{binding}.tokenizer={iterator.config.tokenizer!r} produces token id {top}, but "
            f"the model has LlamaConfig.vocab_size={vocab_size}: use the model's tokenizer")


def check_trainable(optimizer_config, model_config, model_kind: str) -> None:
    """OptimizerConfig.trainable must select some parameter of this model."""
    from jalign.models.build import abstract_model
    from jalign.models.heads import model_class
    from jalign.train.optimizer import trainable_mask
    if optimizer_config.trainable is None:
        return
    _, abstract = abstract_model(model_config, model_cls=model_class(model_kind))
    from flax import nnx
    try:
        trainable_mask(nnx.to_pure_dict(abstract), optimizer_config)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_lora(lora, optimizer_config, algo) -> None:
    """LoraConfig against the rest of the config, before anything is loaded."""
    if lora.quantize is not None and not lora.enabled:
        raise ConfigError(f"LoraConfig.quantize={lora.quantize!r} needs LoraConfig.rank > 0: a "
                          "quantised base trains only through adapters")
    if not lora.enabled:
        return
    if optimizer_config.trainable is not None:
        raise ConfigError(f"OptimizerConfig.trainable={optimizer_config.trainable!r} and "
                          f"LoraConfig.rank={lora.rank} both choose what trains; with LoRA, "
                          "choose adapters with LoraConfig.targets and LoraConfig.layers")
    if (algo.model_kind == "policy_value" and lora.value_base == "shared"
            and algo.value_init != "policy"):
        raise ConfigError(f"LoraConfig.value_base='shared' puts the value model on the policy's "
                          f"base, but PPOConfig.value_init={algo.value_init!r} gives it another "
                          "backbone; set LoraConfig.value_base='own'")


def check_lora_shapes(lora, config) -> None:
    """LoraConfig against the model's shapes (layer count, quantisation block size)."""
    if not lora.enabled:
        return
    from jalign.models.llama import layer_shapes
    from jalign.models.lora import check
    try:
        check(lora, layer_shapes(config), config.num_layers)
    except ValueError as e:
        raise ConfigError(str(e)) from None
