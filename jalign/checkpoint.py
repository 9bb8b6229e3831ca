"""jalign checkpoints: an Orbax CheckpointManager directory of numbered steps.

Each step holds named items. Every checkpoint has
  ``params``        the model parameters as a nested dict (nnx pure dict),
  ``model_config``  the LlamaConfig as JSON,
  ``metadata``      jalign version, step and what wrote it.
Training adds its own items (optimizer state, data-iterator state, operative gin config)
beside these, so a converted model and a training checkpoint share one format and any
training checkpoint can be exported by reading ``params`` alone.

Orbax writes each step to a temporary directory and renames it on commit; restore only
ever sees committed steps.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

import jalign
from jalign.models.build import abstract_model
from jalign.models.config import LlamaConfig
from jalign.models.llama import Llama
from jalign.sharding import DEFAULT_RULES, Rules


class CheckpointError(RuntimeError):
    pass


def manager(directory: str | os.PathLike, **options) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(Path(directory).absolute(),
                                 options=ocp.CheckpointManagerOptions(create=True, **options))


def save_model(directory: str | os.PathLike, config: LlamaConfig, model: Llama, *,
               step: int = 0, extra_metadata: dict | None = None) -> Path:
    """Write a params-only checkpoint (what ``jalign convert hf-to-jalign`` produces)."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    metadata = {"jalign_version": jalign.__version__, "step": step, "kind": "model"}
    metadata.update(extra_metadata or {})
    mngr = manager(directory)
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        model_config=ocp.args.JsonSave(config.to_dict()),
        metadata=ocp.args.JsonSave(metadata)))
    mngr.wait_until_finished()
    mngr.close()
    return Path(directory)


def latest_step(directory: str | os.PathLike) -> int:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    mngr = manager(directory)
    step = mngr.latest_step()
    mngr.close()
    if step is None:
        raise CheckpointError(f"{directory}: no committed checkpoint step found")
    return step


def read_model_config(directory: str | os.PathLike, step: int | None = None) -> LlamaConfig:
    step = latest_step(directory) if step is None else step
    mngr = manager(directory)
    restored = mngr.restore(step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))
    mngr.close()
    return LlamaConfig.from_dict(restored["model_config"])


def load_model(directory: str | os.PathLike, *, step: int | None = None, mesh: Mesh | None = None,
               rules: Rules = DEFAULT_RULES, **config_overrides) -> tuple[LlamaConfig, Llama]:
    """Restore the model of a checkpoint step (default: latest) onto ``mesh``.

    ``config_overrides`` may change execution fields (scan_layers, remat_policy, dtype,
    attention_impl); parameter shapes come from the checkpoint.
    """
    step = latest_step(directory) if step is None else step
    config = read_model_config(directory, step).replace(**config_overrides)
    graphdef, abstract = abstract_model(config, mesh, rules)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                                abstract)
    target = nnx.to_pure_dict(abstract)
    mngr = manager(directory)
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target)))
    finally:
        mngr.close()
    nnx.replace_by_pure_dict(abstract, restored["params"])
    return config, nnx.merge(graphdef, abstract)
