"""A full disk while saving (jalign.checkpoint_space): recognised from what tensorstore
says, warned about before the save, and its noise held back. tests/train/test_loop.py
runs it end to end (JALIGN_FAULT=disk_full_at_save)."""

import errno
import sys

from jalign.checkpoint_space import SpaceCheck, is_disk_full, quiet_saves

# What tensorstore raised when a tmpfs filled up under a real save (paths shortened).
TENSORSTORE = ('RESOURCE_EXHAUSTED: Error writing "opt_state.1.0.nu.policy.lm_head/0.0" in OCDBT '
               'database at local file "/tmp/full/checkpoints/4.orbax-checkpoint-tmp/train_state'
               '/ocdbt.process_0/": Failed writing: "/tmp/full/d/0ff6": Failed to write 418 bytes '
               "to file 9: No space left on device [os_error_code='28']")


def test_a_full_disk_is_told_apart_from_device_memory():
    assert is_disk_full(ValueError(TENSORSTORE))
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    try:  # raised from it, as orbax's threads re-raise
        try:
            raise ValueError(TENSORSTORE)
        except ValueError as inner:
            raise RuntimeError("Save Finalize thread (save_finalize) failed.") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)
    assert not is_disk_full(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to "
                                         "allocate 25.57GiB"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_the_space_check_warns_once_per_shortage(tmp_path):
    said = []
    check = SpaceCheck(said.append)
    check(tmp_path, 1)
    assert said == []
    check(tmp_path, 1 << 62)
    check(tmp_path, 1 << 62)
    assert len(said) == 1 and "the next checkpoint needs ~" in said[0] and str(tmp_path) in said[0]
    check(tmp_path, 1)  # room again: the next shortage is said again
    check(tmp_path, 1 << 62)
    assert len(said) == 2


def test_late_callbacks_of_a_failed_save_are_held_back_and_nothing_else(capsys):
    seen = []
    previous = sys.excepthook
    sys.excepthook = lambda *a: seen.append(str(a[1]))
    try:
        with quiet_saves():
            sys.excepthook(RuntimeError, RuntimeError("Event loop is closed"), None)
            sys.excepthook(ValueError, ValueError("a real error"), None)
        sys.excepthook(RuntimeError, RuntimeError("Event loop is closed"), None)
    finally:
        sys.excepthook = previous
    assert seen == ["a real error", "Event loop is closed"]  # restored after a normal exit
