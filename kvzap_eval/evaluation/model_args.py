"""Our model_args (`kvzap_hf --model_args`, `kvzap-eval sweep --model-args`): which names are ours and how a value
is checked, without importing lm-eval.

Every `MethodConfig` setting is a model_arg, checked by `MethodConfig`'s own rules (the Python API's), plus the
evaluation protocol (`protocol`, `prefill_chunk`). lm-eval passes -5 as int or float and booleans as bool or str;
both are accepted.
"""

from __future__ import annotations

from dataclasses import fields

from ..errors import ConfigError
from ..runtime.methods import MethodConfig, check_setting
from ..settings import as_whole_number
from .protocol import PROTOCOLS

#: The model_args that are method settings: every field of `MethodConfig`.
METHOD_ARGS = tuple(f.name for f in fields(MethodConfig))
#: All model_args of ours; anything else goes to lm-eval's `HFLM`.
OWN_ARGS = (*METHOD_ARGS, "protocol", "prefill_chunk")


def coerce(name: str, value):
    """The checked (and coerced) value of one of our model_args."""
    if name == "protocol":
        if value not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {value!r}")
        return value
    if name == "prefill_chunk":
        return as_whole_number("prefill_chunk", value, 1)
    return check_setting(name, value)


def method_config_from_args(args: dict) -> tuple[MethodConfig, str, int | None]:
    """Our model_args -> (method settings, protocol, prefill chunk). `MethodConfig` checks the method settings (which
    apply to the method, and their values); a prefill_chunk without a protocol means protocol=chunked."""
    args = dict(args)
    protocol = coerce("protocol", args.pop("protocol")) if "protocol" in args else None
    chunk = coerce("prefill_chunk", args.pop("prefill_chunk")) if "prefill_chunk" in args else None
    if protocol == "chunked" and chunk is None:
        raise ConfigError("protocol=chunked needs prefill_chunk=<tokens>, e.g. prefill_chunk=512")
    if protocol == "dense" and chunk is not None:
        raise ConfigError("prefill_chunk does not apply to protocol=dense (one dense prefill): leave one of them out")
    if protocol is None:
        protocol = "chunked" if chunk is not None else "paper"
    return MethodConfig(**args), protocol, chunk
