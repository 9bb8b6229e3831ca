"""Batch sources: where the loop's batches come from.

The loop asks its source for the next batch with ``source.next(state)`` (the current
train state, which a rollout source samples with; a dataset ignores it) and saves
``source.get_state()`` with every checkpoint, so a resumed run continues from exactly
where the source was. ``remaining()`` is the number of batches left when the source is
finite (None: unbounded), so that every process can agree on the last step up front.
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

    @property
    def stats(self) -> dict:
        return self.iterator.stats

    def describe(self) -> str:
        it = self.iterator
        epochs = it.config.num_epochs
        return (f"{epochs} epoch{'s' if epochs != 1 else ''} of {it.stats['examples']} examples "
                f"per process ({it.batches} batches of {it.rows} rows) seen")
