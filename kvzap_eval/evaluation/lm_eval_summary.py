"""The KVzap summary printed under lm-eval's results table: method and settings, achieved compression overall and
per task, KV bytes held against a full cache (and against a layout holding exactly the kept entries, when the
statistics have it), scorer time per layer in prefill and decode, and the scorer backend.

It is text for the terminal only. lm-eval writes its files (`--output_path`) before it prints its table, and the
summary is printed after the table, on stdout, so no lm-eval output format ever contains it; the figures it
shows are the ones in the results JSON under `config.kvzap`. `kvzap_hf` hands its figures over at the end of
each run (`record`, from `get_model_info`, which lm-eval calls once the evaluation is done); `kvzap-eval` prints
them when lm-eval returns, and the stock `lm_eval` command at interpreter exit (`print_at_exit`, set up by its
startup hook).
"""

from __future__ import annotations

import atexit
import sys
from typing import TextIO

TITLE = "KVzap summary"
#: Settings shown on the method line besides the method's own (`MethodConfig`) ones.
RUN_SETTINGS = ("threshold", "protocol", "prefill_chunk")
#: Settings shown on the backend line instead.
BACKEND_SETTINGS = ("backend", "backend_dir", "backend_threads")

_last: dict | None = None  # the kvzap figures of the last finished run in this process


def record(info: dict) -> None:
    """Keep the `kvzap` figures of a finished run (`results["config"]["kvzap"]`) for the summary."""
    global _last
    _last = dict(info)


def print_pending(stream: TextIO | None = None) -> None:
    """Print the summary of the last finished run, once; nothing when no run finished."""
    global _last
    if _last is None:
        return
    info, _last = _last, None
    out = stream or sys.stdout
    out.write(format_summary(info) + "\n")
    out.flush()


def print_at_exit() -> None:
    """Print the summary when the interpreter exits (after lm-eval's table, which it prints last)."""
    atexit.register(print_pending)


def format_summary(info: dict) -> str:
    """The summary of one run's `kvzap` figures, a few aligned lines."""
    lines = [f"{TITLE} (the same figures are in the results JSON under config.kvzap)"]
    lines.append(_row("method", _method_line(info)))
    lines.append(_row("backend", _backend_line(info)))
    ranks = info.get("ranks", 1)
    requests = info.get("requests", 0)
    counted = f"{requests} request{'' if requests == 1 else 's'}" + (f" over {ranks} ranks" if ranks > 1 else "")
    lines.append(_row("compression", f"{_ratio(info.get('achieved_compression_ratio'))} overall ({counted})"))
    per_task = info.get("achieved_compression_ratio_per_task") or {}
    width = max((len(task) for task in per_task), default=0)
    lines += [_row("", f"{task:<{width}}  {_ratio(value)}") for task, value in per_task.items()]
    lines.append(_row("KV bytes", _bytes_line(info)))
    lines.append(_row("scorer time", _scorer_line(info)))
    return "\n".join(lines)


def _row(label: str, text: str) -> str:
    return f"  {label:<12} {text}"


def _ratio(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _method_line(info: dict) -> str:
    from dataclasses import fields

    from ..runtime.methods import MethodConfig

    names = [f.name for f in fields(MethodConfig) if f.name not in ("method", *BACKEND_SETTINGS)]
    settings = {name: info[name] for name in (*names, *RUN_SETTINGS) if info.get(name) is not None}
    text = ", ".join(f"{name} {value}" for name, value in settings.items())
    return f"{info.get('method', '?')}" + (f": {text}" if text else "")


def _backend_line(info: dict) -> str:
    if info.get("backend") is None:
        return f"none (method {info.get('method', '?')} runs no surrogate)"
    extras = [f"{name} {info[name]}" for name in BACKEND_SETTINGS[1:] if info.get(name) is not None]
    return info["backend"] + (f" ({', '.join(extras)})" if extras else "")


def _bytes_line(info: dict) -> str:
    held = info.get("held_kv_bytes", info.get("kv_bytes"))
    full = info.get("full_kv_bytes")
    if held is None or not full:
        return "n/a (no request ran)"
    text = f"{_mib(held)} held vs {_mib(full)} full ({held / full:.1%})"
    kept = info.get("kept_kv_bytes")
    if kept is not None:
        text += f"; a layout holding exactly the kept entries: {_mib(kept)} ({kept / full:.1%})"
    return text + ", summed over requests"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _scorer_line(info: dict) -> str:
    latency = info.get("scorer_latency_us_per_layer") or {}
    calls = info.get("scorer_calls_per_layer") or {}
    parts = []
    for phase in ("prefill", "decode"):
        per_layer = [us for us, n in zip(latency.get(phase, []), calls.get(phase, [])) if n]
        if per_layer:
            mean = sum(per_layer) / len(per_layer)
            parts.append(
                f"{phase} {mean:.0f} us per layer call (layers {min(per_layer):.0f}-{max(per_layer):.0f}, "
                f"{max(calls[phase])} calls per layer)"
            )
    return "; ".join(parts) if parts else "n/a (no scorer calls)"
