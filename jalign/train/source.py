"""Batch sources: where the loop's batches come from.

The loop asks its source for the next batch with ``source.next(state)`` (the current
train state, which a rollout source samples with; a dataset ignores it) and saves
``source.get_state()`` with every checkpoint, so a resumed run continues from exactly
where the source was. A recipe builds its source from the data and a ``SourceContext``:
what a source may use (mesh, rules, the roles and their initial models, the eval data),
not the whole run.

A batch is host-local rows (numpy) or global ``jax.Array``s already laid out for the
step. ``BatchSource`` gives every method but ``next``/``get_state``/``set_state`` the
answer a plain dataset would: a source overrides what differs (a rollout source: a
boundary between rollouts where alone it may be saved, its own step metrics and
evaluation, ``waits_for_state`` when its next draw runs the current state).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass
class SourceContext:
    mesh: Any
    rules: Any
    seed: int                        # TrainConfig.seed: the source's own keys derive from it
    models: Any                      # RunModels: the roles, their configs and graphdefs
    initial: Callable[[str], Any]    # role name -> its initial model (loaded once)
    initial_key: Callable[[str], str]  # role name -> what its initial model depends on
    run_dir: Any                     # where a source may cache what it computed
    eval_data: Any = None            # the eval DataIterator (None: no evaluation)
    eval_batches: int = 0
    accum_steps: int = 1             # TrainConfig.accum_steps: micro-batches per train step
    progress: bool = False
    log: Callable[[str], None] = print


class BatchSource:
    """The protocol, with a dataset's answers as defaults (see the module docstring)."""

    evaluate = None  # a source with ``evaluate(state, step) -> record`` replaces the loss eval

    def next(self, state) -> dict:  # host-local rows; StopIteration at the end
        raise NotImplementedError

    def get_state(self) -> dict:
        raise NotImplementedError

    def set_state(self, state: dict) -> None:
        raise NotImplementedError

    def total(self) -> int | None:       # batches from the start; None: unbounded
        return None

    def remaining(self) -> int | None:   # batches left; None: unbounded
        return None

    def describe(self) -> str:           # what was consumed, for the end-of-data note
        return type(self).__name__

    def at_boundary(self) -> bool:       # may a checkpoint be written now?
        return True

    def waits_for_state(self) -> bool:   # will next() compute with the state?
        return False

    def step_metrics(self) -> dict:      # host metrics of the batch just drawn
        return {}

    @property
    def stats(self) -> dict:             # counts for the run summary
        return {}


class DatasetSource(BatchSource):
    """A ``DataIterator`` (jalign.data.pipeline) as a batch source."""

    def __init__(self, iterator):
        self.iterator = iterator

    def next(self, state=None) -> dict:
        return next(self.iterator)

    def get_state(self) -> dict:
        return self.iterator.get_state()

    def set_state(self, state: dict) -> None:
        self.iterator.set_state(state)

    def total(self) -> int | None:
        return self.iterator.total_batches()

    def remaining(self) -> int | None:
        total = self.total()
        return None if total is None else total - self.iterator.batches

    def batch_rows(self) -> int:
        return self.iterator.config.batch_size

    def row_length(self) -> int:
        return self.iterator.config.max_length

    @property
    def stats(self) -> dict:
        return self.iterator.stats

    def describe(self) -> str:
        it = self.iterator
        epochs = it.config.num_epochs
        return (f"{epochs} epoch{'s' if epochs != 1 else ''} of {it.stats['examples']} examples "
                f"per process ({it.batches} batches of {it.rows} rows) seen")


OPTIONAL = ("batch_rows", "row_length", "at_boundary", "waits_for_state", "step_metrics")


class _WithDefaults:
    """A source with the optional methods it lacks answered as its dataset would."""

    def __init__(self, source, iterator):
        self._source = source
        self._defaults = DatasetSource(iterator)

    def __getattr__(self, name):
        if hasattr(self._source, name):
            return getattr(self._source, name)
        if name in OPTIONAL or name == "evaluate":
            return getattr(self._defaults, name, None)
        raise AttributeError(name)


def complete(source, iterator):
    """``source`` itself when it has every optional method, else a view answering those it
    lacks as its dataset would: a source that is not a ``BatchSource`` (written for the
    first protocol: next, state, counts) keeps working."""
    if all(hasattr(source, name) for name in OPTIONAL):
        return source
    return _WithDefaults(source, iterator)
