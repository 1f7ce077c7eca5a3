"""The Hugging Face Hub as the environment sets it now: offline mode and the cache folder, for models and
surrogates alike. (huggingface_hub reads both once, at its import; a test or a user may set them later.)

Callers look the functions up on the module (`hub_cache.offline()`), so there is one switch to flip in tests.
"""

from __future__ import annotations

import os


def env_true(name: str) -> bool:
    """An environment switch set to 1/on/yes/true (any case)."""
    return os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}


def offline() -> bool:
    """Offline mode: HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set now, or huggingface_hub's own setting."""
    if env_true("HF_HUB_OFFLINE") or env_true("TRANSFORMERS_OFFLINE"):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> str | None:
    """The hub cache folder, read from the environment now; None lets huggingface_hub use its default."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return os.path.expanduser(os.environ[name])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None
