"""Optimizers from config: optax transforms with a schedule, clipping and decay masks.

The optimizer covers what trains: ``TrainState.params``, ``{role: trained tree}``
(``trainable``, a regex or None for everything, chooses it through the roles,
``jalign.train.roles``: a frozen parameter is not in the optimizer at all). A parameter
is addressed by its path within its model, e.g. ``layers/wq`` or ``final_norm``
(``policy/layers/wq`` when a run trains several models, as PPO's policy and value). Weight
decay skips norms and biases by default (regexes in ``no_decay``).
"""

from __future__ import annotations

import dataclasses
import re

import optax
from flax import traverse_util

OPTIMIZERS = ("adamw", "adam", "sgd", "lion", "adafactor")
SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adamw"
    learning_rate: float = 3e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    decay_steps: int | None = None  # None: the run's total steps
    end_lr_ratio: float = 0.1  # final lr = learning_rate * end_lr_ratio
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    no_decay: tuple[str, ...] = (r"norm", r"(^|/)b[a-z_]*$")
    trainable: str | None = None  # regex over parameter paths; None: all

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"OptimizerConfig.name={self.name!r}; one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"OptimizerConfig.schedule={self.schedule!r}; one of {SCHEDULES}")
        if self.learning_rate <= 0:
            raise ValueError(f"OptimizerConfig.learning_rate must be positive, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"OptimizerConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        for name, pattern in [("trainable", self.trainable)] + [("no_decay", p) for p in
                                                                 self.no_decay]:
            try:
                re.compile(pattern or "")
            except re.error as e:
                raise ValueError(f"OptimizerConfig.{name}={pattern!r} is not a regex: {e}") from None


def schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    peak = config.learning_rate
    end = peak * config.end_lr_ratio
    decay = max((config.decay_steps or total_steps) - config.warmup_steps, 1)
    if config.schedule == "constant":
        main = optax.constant_schedule(peak)
    elif config.schedule == "linear":
        main = optax.linear_schedule(peak, end, decay)
    else:
        main = optax.cosine_decay_schedule(peak, decay, alpha=config.end_lr_ratio)
    if config.warmup_steps == 0:
        return main
    warm = optax.linear_schedule(peak / config.warmup_steps, peak, config.warmup_steps)
    return optax.join_schedules([warm, main], [config.warmup_steps])


def named_paths(params: dict) -> dict:
    """{(role, *path): 'name'} for a ``{role: tree}`` params: the path within the model,
    prefixed with the role when several train (the names regexes are matched against)."""
    qualify = len(params) > 1
    return {k: "/".join(map(str, k if qualify else k[1:]))
            for k in traverse_util.flatten_dict(params)}


def decay_mask(params, config: OptimizerConfig):
    patterns = [re.compile(p) for p in config.no_decay]
    names = named_paths(params)
    return traverse_util.unflatten_dict(
        {k: not any(p.search(name) for p in patterns) for k, name in names.items()})


def make_optimizer(config: OptimizerConfig, params, total_steps: int):
    """(optax transform, schedule) over ``params`` (``{role: trained tree}``, arrays or
    shapes: it fixes the decay mask)."""
    lr = schedule(config, total_steps)
    wd_mask = decay_mask(params, config)
    if config.name == "adamw":
        core = optax.adamw(lr, config.b1, config.b2, config.eps,
                           weight_decay=config.weight_decay, mask=wd_mask)
    elif config.name == "adam":
        core = optax.adam(lr, config.b1, config.b2, config.eps)
    elif config.name == "lion":
        core = optax.lion(lr, config.b1, config.b2, weight_decay=config.weight_decay, mask=wd_mask)
    elif config.name == "adafactor":
        core = optax.adafactor(lr, weight_decay_rate=config.weight_decay or None,
                               weight_decay_mask=wd_mask)
    else:
        core = optax.sgd(lr, momentum=config.b1 or None)
    parts = [optax.clip_by_global_norm(config.clip_norm)] if config.clip_norm else []
    return optax.chain(*parts, core), lr
