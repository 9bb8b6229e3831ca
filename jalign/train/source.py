"""Batch sources: where the loop's batches come from.

The loop asks its source for the next batch with ``source.next(state)`` (the current
train state, which a rollout source samples with; a dataset ignores it) and saves
``source.get_state()`` with every checkpoint, so a resumed run continues from exactly
where the source was. ``remaining()`` is the number of batches left when the source is
finite (None: unbounded), so that every process can agree on the last step up front.

A batch is host-local rows (numpy) or global ``jax.Array``s already laid out for the
step. A source whose state is complete only at some steps (a rollout source, between
rollouts) says so with ``at_boundary()``: the loop saves only there. ``bind(run)`` is
called once before the first ``next`` (to compile what the source runs);
``step_metrics()`` adds host metrics to the step just drawn; a source with an
``evaluate(state, step) -> record`` method replaces the loss evaluation.
"""

from __future__ import annotations

from typing import Protocol


class BatchSource(Protocol):
    def next(self, state) -> dict: ...          # host-local rows; StopIteration at the end
    def get_state(self) -> dict: ...
    def set_state(self, state: dict) -> None: ...
    def total(self) -> int | None: ...          # batches from the start; None: unbounded
    def remaining(self) -> int | None: ...      # batches left; None: unbounded
    def describe(self) -> str: ...              # what was consumed, for the end-of-data note
    def batch_rows(self) -> int: ...            # global rows of one train step
    def row_length(self) -> int: ...            # tokens per row
    def bind(self, run) -> None: ...
    def at_boundary(self) -> bool: ...          # may a checkpoint be written now?
    def waits_for_state(self) -> bool: ...      # will next() compute with the state?
    def step_metrics(self) -> dict: ...         # host metrics of the batch just drawn

    @property
    def stats(self) -> dict: ...                # counts for the run summary (may be {})


class DatasetSource:
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

    def bind(self, run) -> None:
        pass

    def at_boundary(self) -> bool:
        return True

    def waits_for_state(self) -> bool:
        return False

    def step_metrics(self) -> dict:
        return {}

    @property
    def stats(self) -> dict:
        return self.iterator.stats

    def describe(self) -> str:
        it = self.iterator
        epochs = it.config.num_epochs
        return (f"{epochs} epoch{'s' if epochs != 1 else ''} of {it.stats['examples']} examples "
                f"per process ({it.batches} batches of {it.rows} rows) seen")


OPTIONAL = ("batch_rows", "row_length", "bind", "at_boundary", "waits_for_state",
            "step_metrics")


class _WithDefaults:
    """A source with the optional methods it lacks answered as a dataset source would."""

    def __init__(self, source, iterator):
        self._source = source
        self._defaults = DatasetSource(iterator)

    def __getattr__(self, name):
        if hasattr(self._source, name):
            return getattr(self._source, name)
        if name in OPTIONAL:
            return getattr(self._defaults, name)
        raise AttributeError(name)


def complete(source, iterator):
    """``source`` itself when it has every BatchSource method, else a view giving the
    optional ones (OPTIONAL) their dataset defaults: a source written for the first
    protocol (next, state, counts) keeps working."""
    if all(hasattr(source, name) for name in OPTIONAL):
        return source
    return _WithDefaults(source, iterator)
