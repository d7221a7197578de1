"""Errors shared across the package (kept import-free so every module can use them)."""


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and its origin."""
