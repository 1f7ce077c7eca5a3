"""Eviction policies: threshold (DMS, what KVzap uses) and fixed-ratio (uniform per head, or AdaKV per layer)."""

from .base import Policy
from .fixed_ratio import FixedRatioPolicy, n_kept_for
from .threshold import ThresholdPolicy

__all__ = ["FixedRatioPolicy", "Policy", "ThresholdPolicy", "n_kept_for"]


def __getattr__(name: str):
    # validate_ratio and validate_threshold live in kvzap_eval.settings now.
    if name in ("validate_ratio", "validate_threshold"):
        from ... import settings
        from ...moved import warn_moved

        warn_moved(f"{__name__}.{name}", f"kvzap_eval.settings.{name}", depth=1)
        return getattr(settings, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
