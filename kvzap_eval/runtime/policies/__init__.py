"""Eviction policies: threshold (DMS, what KVzap uses) and fixed-ratio (uniform per head, or AdaKV per layer)."""

from .base import Policy
from .fixed_ratio import FixedRatioPolicy, n_kept_for, validate_ratio
from .threshold import ThresholdPolicy, validate_threshold

__all__ = ["FixedRatioPolicy", "Policy", "ThresholdPolicy", "n_kept_for", "validate_ratio", "validate_threshold"]
