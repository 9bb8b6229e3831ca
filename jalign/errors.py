"""Errors that name what the user must change (shared by config, preflight and the CLI)."""


class ConfigError(ValueError):
    """A configuration problem; the message names the binding (e.g. ``DataConfig.batch_size``)."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message, first line only (for one-line errors; may be empty)."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else ""


def check_writable(path, what: str) -> None:
    """ConfigError naming ``what`` (e.g. ``TrainConfig.output_root``) when ``path`` (a
    directory or file to be written, existing or not) cannot be written: the nearest
    existing directory on its way must let this user create entries (and an existing
    ``path`` be writable itself)."""
    import os
    from pathlib import Path
    path = Path(path).absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.is_file() and probe != path:
        raise ConfigError(f"{what}: cannot write {path}: {probe} is a file, not a directory")
    needs = os.W_OK | (os.X_OK if probe.is_dir() else 0)
    if not os.access(probe, needs):
        raise ConfigError(f"{what}: cannot write {path}: {probe} is not writable by this "
                          "user (or is on a read-only file system)")


def os_error_line(e: OSError) -> str | None:
    """One line for an OSError a user can act on (permissions, a read-only or full file
    system), or None for any other."""
    import errno
    where = e.filename or "a file"
    if e.errno == errno.EROFS:
        return f"cannot write {where}: {e.strerror}"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"{where}: {e.strerror} (this user may not read or write it)"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full writing {where} ({e.strerror})"
    return None
