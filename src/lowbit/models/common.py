"""Argument checks shared by the reference models."""

from __future__ import annotations

from ..errors import ConfigError


def check_int(value: object, what: str, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise ConfigError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def check_choice(value: object, what: str, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ConfigError listing them."""
    if value not in choices:
        raise ConfigError(f"{what} must be one of {', '.join(choices)}; got {value!r}")
    return value  # type: ignore[return-value]


def check_probability(value: object, what: str) -> float:
    """Return ``value`` if it is a number in [0, 1), else raise ConfigError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{what} must be a number in [0, 1), got {value!r}")
    return float(value)
