"""An experiment = gin files + bindings -> typed configs -> one training run."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from jalign import config as jconfig
from jalign.train.loop import train
from jalign.train.recipe import Recipe
from jalign.train.run import RunConfigs


@dataclasses.dataclass(frozen=True)
class Experiment:
    recipe: Recipe
    configs: RunConfigs
    operative: str
    distributed: object = None

    # The configs by their old names (the demo and scripts read them).
    algorithm = property(lambda self: self.recipe)
    train = property(lambda self: self.configs.train)
    optimizer = property(lambda self: self.configs.optimizer)
    data = property(lambda self: self.configs.data)
    eval_data = property(lambda self: self.configs.eval_data)
    model = property(lambda self: self.configs.model)
    model_init = property(lambda self: self.configs.model_init)
    mesh = property(lambda self: self.configs.mesh)
    lora = property(lambda self: self.configs.lora)


def load_experiment(config_files: Sequence[str], bindings: Sequence[str] = ()) -> Experiment:
    from jalign.rl import reward_functions
    jconfig.parse(config_files, bindings)
    # A reward function's module may sit next to the config that names it.
    reward_functions.set_search_dirs([jconfig.config_file(f).parent for f in config_files])
    tc = jconfig.build("TrainConfig")
    recipe = jconfig.algorithm(tc.algorithm)
    # Eval reads the same source's eval split once, in order, unless eval/ bindings differ.
    eval_data = dataclasses.replace(jconfig.build("DataConfig", scope="eval"), shuffle=False)
    configs = RunConfigs(train=tc, optimizer=jconfig.build("OptimizerConfig"),
                         data=jconfig.build("DataConfig"), eval_data=eval_data,
                         model=jconfig.model_config(), model_init=jconfig.build("ModelInit"),
                         mesh=jconfig.build("MeshConfig"), lora=jconfig.build("LoraConfig"))
    return Experiment(recipe=recipe, configs=configs, operative=jconfig.operative_config(),
                      distributed=jconfig.build("DistributedConfig"))


def _with_injected_nan(recipe: Recipe) -> Recipe:
    """JALIGN_FAULT="nan_at_step:K": the loss of step K (1-based) is NaN (robustness tests)."""
    import os

    import jax.numpy as jnp

    from jalign.losses.types import LossOutput
    from jalign.faults import FAULT_ENV

    steps = [int(p.split(":")[1]) for p in os.environ.get(FAULT_ENV, "").split(",")
             if p.startswith("nan_at_step:")]
    if not steps:
        return recipe
    loss_fn = recipe.loss_fn

    def poisoned(models, batch, ctx):
        out = loss_fn(models, batch, ctx)
        bad = jnp.isin(ctx.step + 1, jnp.asarray(steps))
        return LossOutput(jnp.where(bad, jnp.nan, out.total), out.weight, out.aux)

    return dataclasses.replace(recipe, loss_fn=poisoned)


def run(exp: Experiment, **kwargs) -> dict:
    from jalign import distributed
    distributed.initialize(exp.distributed)  # a no-op for one process, or once joined
    return train(_with_injected_nan(exp.recipe), exp.configs, operative=exp.operative, **kwargs)
