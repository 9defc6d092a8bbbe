"""Errors raised on purpose by lowbit.

Every error names the layer, tensor or option at fault and says what would be
valid. Catch :class:`LowbitError` to handle all of them.
"""

from __future__ import annotations


class LowbitError(Exception):
    """Base class of every error lowbit raises on purpose."""


class ConfigError(LowbitError, ValueError):
    """An option, name, bit width or config value is not valid."""


class CalibrationError(LowbitError, ValueError):
    """Calibration data is missing, empty or not finite."""


class UnsupportedLayerError(LowbitError, TypeError):
    """A layer cannot be converted, saved or exported."""


class ShapeMismatchError(LowbitError, ValueError):
    """Tensors do not match the architecture they are loaded into."""


class DataError(LowbitError, FileNotFoundError):
    """A dataset is missing or malformed; the message says what to install."""


class TrainingError(LowbitError, RuntimeError):
    """Training diverged (NaN/Inf loss) or cannot continue."""


class FormatError(LowbitError, ValueError):
    """A .lowbit file or a coded stream is malformed.

    ``code`` is stable across releases (for example ``"truncated"`` or
    ``"bad-offsets"``) so callers can branch on it; the message names the
    tensor at fault.
    """

    def __init__(self, code: str, message: str):
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
