"""What the processes of a multi-host run agree on: counts, host state, preemption.

Each helper is a collective: every process calls it at the same point, and with one
process it is a plain function of its argument.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np


def agree_min(value: int) -> int:
    """The smallest ``value`` over all processes."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    return int(np.min(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def all_states(state: dict) -> list[dict]:
    """Every process's ``state`` (a JSON-able dict), in process order."""
    if jax.process_count() == 1:
        return [state]
    from jax.experimental import multihost_utils
    data = np.frombuffer(json.dumps(state, sort_keys=True).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray(len(data), np.int64))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[:len(data)] = data
    gathered = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, sizes)]


def from_process_0(value):
    """Process 0's ``value`` (JSON-able) on every process."""
    return all_states({"v": value})[0]["v"]


def merged(state: dict) -> dict:
    """One state holding every process's: dicts are merged key by key, and every other
    value must be the same on all processes. A batch source's state names per-host parts
    by shard (``{"positions": {"0": ..., "1": ...}}``), so those keys do not collide.

    Orbax writes a JSON item from the primary process only; saving this merged state
    instead of process 0's keeps every host's data position."""
    out: dict = {}
    for index, one in enumerate(all_states(state)):
        _merge_into(out, one, index, "")
    return out


def _merge_into(out: dict, new: dict, index: int, where: str) -> None:
    for key, value in new.items():
        path = f"{where}.{key}" if where else key
        if key not in out:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            _merge_into(out[key], value, index, path)
        elif out[key] != value:
            raise RuntimeError(f"the batch source's state {path!r} differs between processes "
                               f"({out[key]!r} before process {index}, {value!r} there): a "
                               "per-host part must be keyed by its shard")


class Preemption:
    """SIGTERM (a preemption notice), as a step every process saves at; and Ctrl-C.

    One process: a Python handler notes the signal and the loop saves after the step in
    flight. Several: a host that saves alone would hang the collective save, so the
    notice goes through JAX's preemption sync manager (started by
    ``jax.distributed.initialize``; it catches SIGTERM itself, so no Python handler is
    installed): ``reached(step)``, called by every process at every step, turns True at
    the same step everywhere (one past the furthest any host had got when the notice
    arrived).

    Ctrl-C (SIGINT) on one process: the first is a request like SIGTERM (the step in
    flight finishes and is saved; ``interrupted`` tells the loop to exit as interrupted,
    not preempted), the second stops at once (KeyboardInterrupt, nothing more saved).
    Several processes keep Python's default (a save from one host alone would hang)."""

    def __init__(self, say=None):
        self.requested = False  # latched: a source may only save at its next boundary
        self.interrupted = False
        self._say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        self._previous_int = None
        from jax._src import distributed as jax_distributed
        # JAX's sync manager exists once joined (unless its preemption service is off:
        # then each host notes its own SIGTERM, as one process does).
        self._multi = (jax.process_count() > 1 and
                       jax_distributed.global_state.preemption_sync_manager is not None)
        self._previous = None

    def __enter__(self):
        if self._multi:
            return self
        import signal

        def handler(signum, frame):
            self.requested = True

        def interrupt(signum, frame):
            if self.interrupted:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            self.interrupted = self.requested = True
            self._say("\nCtrl-C: finishing the step in flight, saving it, then exiting "
                      "(Ctrl-C again stops at once, without saving)")
        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
            if jax.process_count() == 1:  # several: one host saving alone would hang
                self._previous_int = signal.signal(signal.SIGINT, interrupt)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def __exit__(self, *exc):
        import signal
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        if self._previous_int is not None:
            signal.signal(signal.SIGINT, self._previous_int)

    def reached(self, step: int) -> bool:
        """Whether the run should save and stop (now, or at the source's next boundary);
        every process must call this once per step, with the same ``step``."""
        if self._multi and not self.requested:
            from jax.experimental import multihost_utils
            self.requested = bool(multihost_utils.reached_preemption_sync_point(step))
        return self.requested


def check_same_directory(directory, what: str) -> None:
    """Every process sees what process 0 writes in ``directory`` (a run directory on one
    file system they share); otherwise each host would save and resume on its own copy.
    Raises the same ConfigError on every process."""
    if jax.process_count() == 1:
        return
    import os
    import time
    from pathlib import Path

    from jalign.errors import ConfigError
    marker = Path(directory) / ".jalign_hosts"
    token = f"{time.time_ns()}-{os.getpid()}"
    if jax.process_index() == 0:
        marker.write_text(token)
    token0 = all_states({"token": token})[0]["token"]  # also a barrier: written before
    try:
        seen = marker.read_text() == token0
    except OSError:
        seen = False
    blind = [i for i, s in enumerate(all_states({"seen": seen})) if not s["seen"]]
    if blind:
        raise ConfigError(f"{what}: process(es) {blind} do not see the file process 0 wrote "
                          f"in {directory}: every host needs the same run directory (an "
                          "output_root on a file system all hosts share)")


def agree_on(value, what: str):
    """``value`` (JSON-able), which every process must have found the same; else the same
    ConfigError on every process naming who saw what."""
    values = [s["v"] for s in all_states({"v": value})]
    if any(v != values[0] for v in values):
        from jalign.errors import ConfigError
        shown = "; ".join(f"process {i}: {v}" for i, v in enumerate(values[:8]))
        raise ConfigError(f"the hosts disagree on {what} ({shown}): every host needs the "
                          "same run directory (an output_root on a file system all hosts share)")
    return value
