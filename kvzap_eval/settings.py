"""The values of settings: their defaults and their checks, one home for every entry point (the Python API,
lm-eval's `kvzap_hf` model_args, `kvzap-eval sweep`, the exporters).

Each check coerces what a user may write (Python values, or the strings of `model_args`) and refuses anything else
with a `ConfigError` that names the fix: `as_whole_number` takes 3, "3" or 3.0 but not 2.5 or True; `as_bool` takes
true/false words but not "maybe". Which method takes which setting is the method table's business
(`runtime/methods.py`), not this module's.
"""

from __future__ import annotations

import math
import os

from .errors import ConfigError

#: KVzap's threshold tau when neither the user nor the surrogate's training report gives one (the paper's Qwen3 value).
DEFAULT_THRESHOLD = -4.0
#: Recent tokens a threshold policy never evicts (the paper's w).
DEFAULT_WINDOW = 128
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def validate_threshold(value) -> float:
    """A threshold tau as float (numbers or numeric strings); NaN and infinities are refused."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"threshold must be a number (log-score, e.g. -4), got {value!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"threshold must be finite, got {value} (the paper uses -6..-3 for Qwen3, -9..-6 for Llama)")
    return value


def validate_ratio(value) -> float:
    """A compression ratio (the fraction of entries removed) as float in [0, 1)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"compression_ratio must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"compression_ratio must be in [0, 1), got {value} (0.67 removes two thirds: 3x)")
    return value


def validate_window(value) -> int:
    """A threshold policy's window: a whole number (8 or 8.0, not "8": strings are `as_whole_number`'s) >= 0."""
    number = None if isinstance(value, str) else _whole(value)
    if number is None or number < 0:
        raise ConfigError(f"window must be a non-negative integer, got {value!r} (the paper uses {DEFAULT_WINDOW})")
    return number


def as_whole_number(name: str, value, minimum: int = 0, maximum: int | None = None) -> int:
    """An integer (3, "3" or 3.0; not 2.5, "2.5" or True) in [minimum, maximum]."""
    number = _whole(value)
    bound = "a non-negative" if minimum == 0 else ("a positive" if minimum == 1 else f"a >= {minimum}")
    if number is None:
        raise ConfigError(f"{name}={value!r} is not a whole number: give {bound} integer")
    if number < minimum or (maximum is not None and number > maximum):
        limit = f" at most {maximum}" if maximum is not None else ""
        raise ConfigError(f"{name} must be {bound} integer{limit}, got {number}")
    return number


def _whole(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def as_number(name: str, value, low: float | None = None, high: float | None = None) -> float:
    """A finite float (numbers or numeric strings; not booleans) in [low, high]."""
    number = None
    if not isinstance(value, bool):
        try:
            number = float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            number = None
    if number is None or not math.isfinite(number):
        raise ConfigError(f"{name}={value!r} must be a finite number")
    if (low is not None and number < low) or (high is not None and number > high):
        raise ConfigError(f"{name} must be in [{low}, {high}], got {number}")
    return number


def as_bool(name: str, value) -> bool:
    """True/False, 1/0, or one of the words true/false, yes/no, on/off, 1/0 (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in TRUE_WORDS or text in FALSE_WORDS:
            return text in TRUE_WORDS
    raise ConfigError(f"{name}={value!r} must be true or false")


def as_text(name: str, value) -> str:
    """A non-empty string (a path is turned into its string)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name}={value!r} must be a non-empty name or path (leave it out for the default)")
    return value


def as_choice(name: str, value, choices: tuple[str, ...], what: str) -> str:
    """One of `choices`; `what` names the setting in the message ("method", "scorer backend")."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"unknown {what} {value!r}: choose one of {', '.join(choices)}")
    return value
