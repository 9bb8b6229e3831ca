"""Directories written whole or not at all (exports, a run's tokenizer), as the user's
umask says, never losing the directory they replace.

``atomic_directory(out)`` yields a hidden sibling (``.NAME.tmp-HOST-PID-*``) to write into;
on success it replaces ``out``: the old ``out`` is first moved aside (``.NAME.old-HOST-PID-*``)
and removed only once the new one is in place, so an interrupted replacement leaves the
old one. What a killed writer left behind is settled by the next writer to the same place
on the same host: a stale temporary directory is removed, a stale set-aside old one is put
back where ``out`` is missing (else removed), each said.

The temporary directory is created private (``mkdtemp``: 0700); its tree gets the modes a
plain ``mkdir``/``open`` would have given under the umask before it is moved in, so a
serving process or another user can read the export as they could any other file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-"


def _stale(path: Path, kind: str, out: Path) -> bool:
    """``path`` (``.NAME.{kind}-HOST-PID-*``) was left by a writer on this host that is gone."""
    parts = path.name[len(f".{out.name}.{kind}-"):].rsplit("-", 2)  # host, pid, random
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    return not pid_alive(int(parts[1]))


def settle_leftovers(out: Path, say=_say) -> None:
    """Remove what killed writers of ``out`` on this host left; put back an old ``out``
    that a killed replacement had moved aside."""
    for old in sorted(out.parent.glob(f".{out.name}.old-*")):
        if not _stale(old, "old", out):
            continue
        if not out.exists():
            os.replace(old, out)
            say(f"note: put back {out} from {old.name}, where an interrupted replacement "
                "had left it")
        else:
            shutil.rmtree(old, ignore_errors=True)
            say(f"note: removed {old.name}, the previous {out.name} an interrupted "
                "replacement left")
    for tmp in sorted(out.parent.glob(f".{out.name}.tmp-*")):
        if _stale(tmp, "tmp", out):
            shutil.rmtree(tmp, ignore_errors=True)
            say(f"note: removed {tmp.name}, left by an interrupted write of {out.name}")


def _follow_umask(root: Path) -> None:
    mask = _umask()
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_directory(out: Path, *, overwrite: bool = False, say=_say):
    """Yields a temporary sibling of ``out`` to write into; on success it replaces ``out``
    (see the module docstring). A non-empty ``out`` is refused unless ``overwrite``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settle_leftovers(out, say)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{_tag()}", dir=out.parent))
    try:
        yield tmp
        _follow_umask(tmp)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{_tag()}", dir=out.parent))
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None and not out.exists():
                os.replace(old, out)  # the old one back where it was
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
