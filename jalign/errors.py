"""Errors that name what the user must change (shared by config, preflight and the CLI)."""


class ConfigError(ValueError):
    """A configuration problem; the message names the binding (e.g. ``DataConfig.batch_size``)."""
