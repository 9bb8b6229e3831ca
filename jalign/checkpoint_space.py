"""A full disk while saving: said as such, once, with what to do.

Orbax writes a checkpoint through tensorstore in background threads; a full file system
surfaces as ``RESOURCE_EXHAUSTED: Error writing ... No space left on device`` raised at the
next save, wait or close (which the CLI would otherwise take for device memory), after
orbax's threads have logged it and the event loop's late callbacks have printed dozens of
``Event loop is closed`` tracebacks. Here: the error is recognised (``is_disk_full``) and
re-raised as ``DiskFull`` naming the directory, the free space, the checkpoint's size and
the intact previous step; the noise of the failed save is held back (``quiet_saves``);
and the free space is checked before each save (``SpaceCheck``), with a warning when the
next checkpoint will not fit.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import shutil
import sys

GiB = 1024 ** 3
_FULL = re.compile(r"No space left on device|Disk quota exceeded|os_error_code='(28|122)'")


class DiskFull(Exception):
    """A checkpoint could not be written: its file system is full."""


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` (or what it was raised from) says the file system is full."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if _FULL.search(str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


def size_text(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2 ** 20:.1f} MiB"


def free_bytes(directory) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def disk_full_message(directory, step: int | None, needed: int, intact: int | None) -> str:
    free = free_bytes(directory)
    which = f"the checkpoint of step {step}" if step is not None else "a checkpoint"
    room = f"{size_text(free)} free there" if free is not None else "free space unknown"
    if needed:
        room += f"; a checkpoint of this run takes ~{size_text(needed)}"
    kept = (f"Checkpoint {intact} is intact and the half-written one is ignored on resume"
            if intact is not None else "No checkpoint was committed yet")
    return (f"the disk is full: {which} could not be written to {directory} ({room}). "
            f"{kept}: free space (or lower TrainConfig.keep, or move TrainConfig.output_root) "
            "and run the same command again to continue")


class SpaceCheck:
    """Warns (once per shortage) when the next checkpoint will not fit its file system."""

    def __init__(self, warn=None):
        self.warn = warn or (lambda text: print(text, file=sys.stderr, flush=True))
        self.warned = False

    def __call__(self, directory, needed: int) -> None:
        free = free_bytes(directory)
        if free is None:
            return
        short = free < needed
        if short and not self.warned:
            self.warn(f"warning: {size_text(free)} free on the file system of {directory}, "
                      f"and the next checkpoint needs ~{size_text(needed)}: it will likely "
                      "fail (the previous checkpoint stays intact)")
        self.warned = short


class _DropOrbaxErrors(logging.Filter):
    """Orbax's own ERROR records of a failed background save: the same error reaches the
    main thread at the next save, wait or close, where it is reported (or re-raised)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


def _late_callback(exc) -> bool:
    """An asyncio callback delivered after a failed save closed its loop or executor."""
    return (isinstance(exc, RuntimeError) and str(exc) in (
        "Event loop is closed", "cannot schedule new futures after shutdown"))


@contextlib.contextmanager
def quiet_saves():
    """Hold back the noise of a failed background save (see the module docstring): orbax's
    ERROR records and the late callbacks' tracebacks, whichever hook prints them. After a
    DiskFull the process is about to stop while orbax's threads wind down: the filters
    then stay for its last moments."""
    import threading
    logger = logging.getLogger("absl")
    noise = _DropOrbaxErrors()
    logger.addFilter(noise)
    hooks = (sys.excepthook, sys.unraisablehook, threading.excepthook)

    def excepthook(exc_type, exc, tb):
        if not _late_callback(exc):
            hooks[0](exc_type, exc, tb)

    def unraisablehook(info):
        if not _late_callback(info.exc_value):
            hooks[1](info)

    def thread_hook(args):
        if not _late_callback(args.exc_value):
            hooks[2](args)
    sys.excepthook, sys.unraisablehook, threading.excepthook = (
        excepthook, unraisablehook, thread_hook)
    failed = False
    try:
        yield
    except DiskFull:
        failed = True
        raise
    finally:
        if not failed:
            sys.excepthook, sys.unraisablehook, threading.excepthook = hooks
            logger.removeFilter(noise)
