"""Rewards for RL: a registry of reward functions chosen by name, users' own functions
(``RewardConfig.functions``, ``jalign.rl.reward_functions``), a reward-model scorer, and
their weighted combination.

A reward is ``fn(prompts, completions, **fields) -> one float per completion``:
``prompts`` the user messages, ``completions`` the decoded responses, ``fields`` the
prompt records' other columns and ``completion_lengths`` (token counts); the built-in
ones also get ``config`` (the RewardConfig). Registered (``REWARDS``):
- ``task``: 1 if the completion is the bundled task's exact answer (``jalign.data.tasks``;
  recomputed from the prompt), else 0;
- ``length``: −``length_coef`` per token beyond ``length_target``;
- ``format``: 1 if the completion (its first line, stripped) matches ``format_regex``.
``reward_model``: the score a reward model (a jalign ``ScalarHeadModel`` checkpoint, or an
HF ``LlamaForSequenceClassification``: ``RewardConfig.reward_model='jalign:DIR'|'hf:PATH'``)
gives the token sequence prompt + response at its last response token.
The scores are combined as Σ weight_i · score_i; each component is also reported.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jalign.data import tasks


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Which rewards, with which weights (gin: ``RewardConfig.names = ('task', 'length')``)."""

    names: tuple[str, ...] = ("task",)
    weights: tuple[float, ...] = (1.0,)
    # Users' reward functions, 'module:function' (jalign.rl.reward_functions), and their
    # weights (empty: 1 each).
    functions: tuple[str, ...] = ()
    function_weights: tuple[float, ...] = ()
    task: str = "add"
    length_coef: float = 0.0
    length_target: int = 0
    format_regex: str = r"\d+"
    reward_model: str = ""  # 'jalign:DIR' or 'hf:PATH' for the 'reward_model' reward
    # Reward functions reported in evaluation only, never trained on (e.g. the task
    # checker's accuracy of a policy trained on a reward model's scores).
    eval_names: tuple[str, ...] = ()

    def __post_init__(self):
        if len(self.names) != len(self.weights):
            raise ValueError(f"RewardConfig.names has {len(self.names)} entries, "
                             f"RewardConfig.weights {len(self.weights)}: give one weight each")
        from jalign.rl.reward_functions import parse_spec
        for spec in self.functions:
            parse_spec(spec)
        if self.function_weights and len(self.function_weights) != len(self.functions):
            raise ValueError(f"RewardConfig.functions has {len(self.functions)} entries, "
                             f"RewardConfig.function_weights {len(self.function_weights)}: "
                             "give one weight each (or none: 1 each)")
        if not self.names and not self.functions:
            raise ValueError("no reward: set RewardConfig.names or RewardConfig.functions")
        known = tuple(REWARDS) + ("reward_model",)
        for name in self.names:
            if name not in known:
                raise ValueError(f"RewardConfig.names: unknown reward {name!r}; one of {known}")
        for name in self.eval_names:
            if name not in REWARDS:
                raise ValueError(f"RewardConfig.eval_names: unknown reward {name!r}; one of "
                                 f"{tuple(REWARDS)}")
        if "reward_model" in self.names:
            from jalign.sources import ModelSource
            if not self.reward_model or ModelSource.parse(
                    self.reward_model, what="RewardConfig.reward_model").scheme == "random":
                raise ValueError("RewardConfig.reward_model must be 'jalign:DIR' or 'hf:PATH' "
                                 "when 'reward_model' is in RewardConfig.names, got "
                                 f"{self.reward_model!r}")
        try:
            re.compile(self.format_regex)
        except re.error as e:
            raise ValueError(f"RewardConfig.format_regex={self.format_regex!r}: {e}") from None


    def load_functions(self) -> list[tuple[str, Callable, float]]:
        """(name, function, weight) of each user function, imported (ConfigError naming
        the one that does not import)."""
        from jalign.rl.reward_functions import load_function
        weights = self.function_weights or (1.0,) * len(self.functions)
        return [(spec, load_function(spec), float(w)) for spec, w in zip(self.functions, weights)]


def task_reward(prompts, completions, completion_lengths=None, config: RewardConfig = None,
                **fields) -> np.ndarray:
    return np.array([float(tasks.check(config.task, p, c)) for p, c in zip(prompts, completions)],
                    np.float32)


def length_penalty(prompts, completions, completion_lengths=None, config: RewardConfig = None,
                   **fields) -> np.ndarray:
    over = np.maximum(np.asarray(completion_lengths, np.float32) - config.length_target, 0.0)
    return (-config.length_coef * over).astype(np.float32)


def format_reward(prompts, completions, completion_lengths=None, config: RewardConfig = None,
                  **fields) -> np.ndarray:
    pattern = re.compile(config.format_regex)
    return np.array([float(bool(pattern.fullmatch(tasks.normalize_completion(c))))
                     for c in completions], np.float32)


REWARDS: dict[str, Callable] = {"task": task_reward, "length": length_penalty,
                                "format": format_reward}


class RewardModelScorer:
    """Scores of a reward model at the last real token of each right-padded row."""

    def __init__(self, model):
        from flax import nnx
        self.model = model
        self._score = nnx.jit(lambda m, ids, seg: m.sequence_scores(ids, seg))

    @classmethod
    def load(cls, source: str, mesh=None) -> "RewardModelScorer":
        """A reward model from a model source (``jalign:DIR`` or ``hf:PATH``), read with
        a scalar head."""
        from jalign import sources
        from jalign.models.heads import SCALAR
        _, model = sources.load(source, head=SCALAR, mesh=mesh)
        return cls(model)

    def __call__(self, input_ids, segment_ids) -> np.ndarray:
        out = self._score(self.model, jnp.asarray(input_ids), jnp.asarray(segment_ids))
        return np.asarray(jax.device_get(out), np.float32)


def combined_rewards(config: RewardConfig, prompts: Sequence, completions: Sequence[str],
                     lengths, *, tokens=None, scorer: RewardModelScorer | None = None,
                     fields: dict | None = None, functions=None):
    """(scores [batch], {name: component scores}) = Σ weight · component.

    ``tokens``: (input_ids, segment_ids) of prompt + response rows, right-padded, for the
    ``reward_model`` component (scored by ``scorer``). ``fields``: the prompt records'
    columns, each a list aligned with the completions. ``functions``: the user functions
    (``config.load_functions()``, imported once by the caller; loaded here when None)."""
    from jalign.rl.reward_functions import call
    clash = {"completion_lengths", "config"} & set(fields or {})
    if clash:
        raise ValueError(f"the prompt records have columns named {sorted(clash)}, which the "
                         "reward functions' own keyword arguments use: rename them "
                         "(DataConfig.columns)")
    kwargs = {**(fields or {}), "completion_lengths": np.asarray(lengths)}
    parts, weighted = {}, []
    for name, weight in zip(config.names, config.weights):
        if name == "reward_model":
            if scorer is None or tokens is None:
                raise ValueError("the 'reward_model' reward needs a scorer and the token rows")
            parts[name] = scorer(*tokens)
        else:
            fn = functools.partial(REWARDS[name], config=config)
            parts[name] = call(f"{name!r} (built in)", fn, prompts, completions, kwargs)
        weighted.append((name, weight))
    for spec, fn, weight in (config.load_functions() if functions is None else functions):
        parts[spec] = call(spec, fn, prompts, completions, kwargs)
        weighted.append((spec, weight))
    total = np.zeros(len(completions), np.float32)
    for name, weight in weighted:
        total += np.float32(weight) * parts[name]
    return total, parts
