"""KVzap surrogates: the model (`model.py`), the `nvidia/KVzap-*` checkpoint format (`checkpoint.py`) and where
checkpoints come from (`hub.py`)."""

from .checkpoint import WEIGHTS_NAME, load_surrogate, save_surrogate
from .hub import (
    CONFIG_NAME,
    SHIPPED,
    SURROGATES_DIR,
    default_surrogate_id,
    download_snapshot,
    resolve_surrogate_source,
    shipped_surrogate,
    surrogate_source_for,
)
from .model import (
    SURROGATE_TYPES,
    KVzapSurrogate,
    SurrogateConfig,
    check_against_model,
    check_hidden_dim,
    expected_tensor_shapes,
    random_surrogate,
    surrogate_config_for,
)

__all__ = [
    "CONFIG_NAME",
    "SHIPPED",
    "SURROGATES_DIR",
    "SURROGATE_TYPES",
    "WEIGHTS_NAME",
    "KVzapSurrogate",
    "SurrogateConfig",
    "check_against_model",
    "check_hidden_dim",
    "default_surrogate_id",
    "download_snapshot",
    "expected_tensor_shapes",
    "load_surrogate",
    "random_surrogate",
    "resolve_surrogate_source",
    "save_surrogate",
    "shipped_surrogate",
    "surrogate_config_for",
    "surrogate_source_for",
]
