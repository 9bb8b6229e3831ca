"""Errors that name what the user must change (shared by config, preflight and the CLI)."""


class ConfigError(ValueError):
    """A configuration problem; the message names the binding (e.g. ``DataConfig.batch_size``)."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message, first line only (for one-line errors; may be empty)."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else ""
