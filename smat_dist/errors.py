"""Errors shared across the package (kept import-free so every module can use them)."""


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and its origin."""


def require(ok: bool, key: str, rule: str, value: object) -> None:
    """The one idiom of every config section's ``validate()``: ``require(x >= 1, "model.gates.num_experts",
    ">= 1", x)`` raises ``ConfigError("model.gates.num_experts must be >= 1, got 0")``."""
    if not ok:
        raise ConfigError(f"{key} must be {rule}, got {value!r}")
