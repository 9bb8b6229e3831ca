"""One run per run directory.

Two ``jalign train`` processes on one run directory would overwrite each other's
checkpoints, operative config and metrics without a word. A run therefore holds an
exclusive lock on ``RUN_DIR/.jalign_lock`` for its whole life (process 0 of a multi-host
run holds it for all). The lock is the operating system's (``flock``): a process that
dies, however it dies, releases it, so a crashed run never blocks the next one. The file
also names its holder (pid, host, since when) for the error a second run gets; a holder
named there whose lock is free was a crashed run, and taking over from it is said.

Where the file system has no ``flock`` (some network file systems), the named holder
decides: a live process on this host, or any process on another host, keeps the
directory (the error says which file to delete if that run is gone).
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
from pathlib import Path

from jalign.atomic_dir import pid_alive as _alive
from jalign.errors import ConfigError

LOCK_NAME = ".jalign_lock"


class RunLock:
    """The exclusive lock of a run directory (see the module docstring)."""

    def __init__(self, run_dir, what: str = "TrainConfig.run_name"):
        self.path = Path(run_dir) / LOCK_NAME
        self.what = what
        self._file = None

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _busy(self, holder: dict, extra: str = "") -> ConfigError:
        who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} (since "
               f"{holder.get('since', '?')})" if holder else "another process")
        return ConfigError(f"{self.what}: the run directory {self.path.parent} is in use by "
                           f"{who}: wait for that run to end or stop it, or choose another "
                           f"{self.what}{extra}")

    def acquire(self, log=print) -> None:
        """Take the lock, or raise ConfigError naming its holder."""
        import fcntl
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            f.close()
            raise self._busy(self._holder()) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                f.close()
                raise
            locked = False  # no flock here: the named holder decides
        previous = self._holder()
        if previous and not locked:
            same_host = previous.get("host") == socket.gethostname()
            pid = previous.get("pid")
            if not same_host or not isinstance(pid, int) or _alive(pid):
                f.close()
                raise self._busy(previous, f" (this file system has no locks: if that run "
                                           f"is gone, delete {self.path})")
        if previous and previous.get("pid") != os.getpid():
            log(f"note: {self.path.parent} was locked by pid {previous.get('pid')} on "
                f"{previous.get('host')} (since {previous.get('since')}), which is gone "
                "(a run that crashed or was killed): taking it over")
        since = datetime.datetime.now().isoformat(timespec="seconds")
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}))
        f.flush()
        self._file = f

    def release(self) -> None:
        """Empty the file (no holder) and let go; idempotent."""
        f, self._file = self._file, None
        if f is None:
            return
        try:
            f.seek(0)
            f.truncate()
            f.flush()
        except OSError:
            pass  # the lock goes with the file descriptor anyway
        f.close()

    @property
    def held(self) -> bool:
        return self._file is not None
