"""An experiment = gin files + bindings -> typed configs -> one training run."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from jalign import config as jconfig
from jalign.train.loop import train


@dataclasses.dataclass(frozen=True)
class Experiment:
    algorithm: object
    train: object
    optimizer: object
    data: object
    eval_data: object
    model: object
    model_init: object
    mesh: object
    operative: str
    lora: object = None
    distributed: object = None


def load_experiment(config_files: Sequence[str], bindings: Sequence[str] = ()) -> Experiment:
    jconfig.parse(config_files, bindings)
    tc = jconfig.build("TrainConfig")
    algorithm = jconfig.algorithm(tc.algorithm)
    data = jconfig.build("DataConfig")
    # Eval reads the same source's eval split once, in order, unless eval/ bindings differ.
    eval_data = dataclasses.replace(jconfig.build("DataConfig", scope="eval"), shuffle=False)
    exp = Experiment(algorithm=algorithm, train=tc, optimizer=jconfig.build("OptimizerConfig"), data=data,
                     eval_data=eval_data, model=jconfig.model_config(),
                     model_init=jconfig.build("ModelInit"), mesh=jconfig.build("MeshConfig"),
                     lora=jconfig.build("LoraConfig"),
                     distributed=jconfig.build("DistributedConfig"),
                     operative=jconfig.operative_config())
    return exp


def _with_injected_nan(algorithm):
    """JALIGN_FAULT="nan_at_step:K": the loss of step K (1-based) is NaN (robustness tests)."""
    import os

    import jax.numpy as jnp

    from jalign.losses.types import LossOutput
    from jalign.train.loop import FAULT_ENV

    steps = [int(p.split(":")[1]) for p in os.environ.get(FAULT_ENV, "").split(",")
             if p.startswith("nan_at_step:")]
    if not steps:
        return algorithm
    loss_fn = algorithm.loss_fn

    def poisoned(model, batch, ctx):
        out = loss_fn(model, batch, ctx)
        bad = jnp.isin(ctx.step + 1, jnp.asarray(steps))
        return LossOutput(jnp.where(bad, jnp.nan, out.total), out.weight, out.aux)

    return dataclasses.replace(algorithm, loss_fn=poisoned)


def run(exp: Experiment, **kwargs) -> dict:
    from jalign import distributed
    distributed.initialize(exp.distributed)  # a no-op for one process, or once joined
    return train(_with_injected_nan(exp.algorithm), train_config=exp.train,
                 optimizer_config=exp.optimizer, data_config=exp.data,
                 eval_data_config=exp.eval_data, model_config=exp.model,
                 model_init=exp.model_init, mesh_config=exp.mesh,
                 operative_config=exp.operative, lora_config=exp.lora, **kwargs)
