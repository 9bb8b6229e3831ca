"""Checks a run makes before it loads a model or compiles anything.

Every problem knowable at start (a batch the mesh cannot split, a data format the
algorithm cannot train on, a missing split or file, a tokenizer the model's vocabulary
cannot hold) is a one-line ``ConfigError`` naming the binding to change, instead of a
traceback after the first eval or a silently replicated batch.
"""

from __future__ import annotations

import math

import jax
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


def check_data_kind(recipe, config: DataConfig, binding: str) -> None:
    from jalign.data.formats import adapter
    kind, _ = adapter(config.format)
    if kind != recipe.data_kind:
        raise ConfigError(f"{binding}.format={config.format!r} gives {kind} data, but "
                          f"TrainConfig.algorithm={recipe.family!r} trains on "
                          f"{recipe.data_kind} data")


def open_data(config: DataConfig, binding: str, **kwargs):
    """build_iterator with its errors named after the binding (``eval/DataConfig`` ...)."""
    try:
        return build_iterator(config, **kwargs)
    except FieldError as e:
        raise ConfigError(f"{binding}.{e.field}={e.value!r}: {e.message}") from None
    except DataError as e:
        raise ConfigError(f"{binding} (path={config.path!r}): {e}") from None


def check_vocab(iterator, model_config, named: str) -> None:
    """The tokenizer fits the model: token ids the embedding cannot hold would be clamped
    silently by XLA. ``named``: how the tokenizer binding reads ('DataConfig.tokenizer=...')."""
    size = len(iterator.chat.tokenizer)
    top = max(iterator.stats.get("max_token_id", -1), size - 1)
    vocab_size = model_config.vocab_size
    if top >= vocab_size:
        raise ConfigError(
            f"{named} has {size} tokens (ids up to {top}), but the model has "
            f"{type(model_config).__name__}.vocab_size={vocab_size}: use the model's "
            "tokenizer")


def check_trainable(models, optimizer_config) -> None:
    """OptimizerConfig.trainable must select some parameter of the models it applies to."""
    from jalign.train.roles import KEYWORDS
    from jalign.train.state_init import role_parts
    pattern = optimizer_config.trainable
    if pattern is None or not any(models.role(n).trains == pattern for n in models.trained):
        return
    params, _, fixed, _ = role_parts(models)
    if not any(jax.tree.leaves(params.get(n, {})) for n in models.trained
               if models.role(n).trains not in KEYWORDS):
        from flax import traverse_util
        names = sorted("/".join(map(str, k)) for k in traverse_util.flatten_dict(fixed))[:5]
        raise ConfigError(f"OptimizerConfig.trainable={pattern!r} matches no parameter; "
                          f"paths look like {names}")


def check_lora(lora, optimizer_config) -> None:
    """LoraConfig against the rest of the config, before anything is loaded."""
    if lora.quantize is not None and not lora.enabled:
        raise ConfigError(f"LoraConfig.quantize={lora.quantize!r} needs LoraConfig.rank > 0: a "
                          "quantised base trains only through adapters")
    if lora.enabled and optimizer_config.trainable is not None:
        raise ConfigError(f"OptimizerConfig.trainable={optimizer_config.trainable!r} and "
                          f"LoraConfig.rank={lora.rank} both choose what trains; with LoRA, "
                          "choose adapters with LoraConfig.targets and LoraConfig.layers")


def check_role_sources(models, overrides) -> None:
    """Every role read from a source of its own has the run's architecture (read from the
    source's config, before any weight is)."""
    from jalign import sources
    from jalign.models.families import architecture_differences
    want = models.configs[models.primary]
    for role in models.roles:
        if role.source is None:
            continue
        binding = role.set_by or f"role {role.name!r}"
        try:
            have = sources.read_config(sources.ModelSource.parse(role.source, what=binding),
                                       overrides=overrides)
        except (OSError, ValueError, RuntimeError) as e:
            raise ConfigError(f"{binding}={role.source!r}: {e}") from None
        differ = architecture_differences(have, want.replace(lora=None))
        if differ:
            raise ConfigError(f"{binding}={role.source!r}: the {role.name} model must have the "
                              f"architecture of the run's model ({'; '.join(differ)})")


def check_lora_shapes(lora, config) -> None:
    """LoraConfig against the model's shapes (layer count, quantisation block size)."""
    if not lora.enabled:
        return
    from jalign.models.families import family_of
    from jalign.models.lora import check
    try:
        check(lora, family_of(config).layer_shapes(config), config.num_layers)
    except ValueError as e:
        raise ConfigError(str(e)) from None
