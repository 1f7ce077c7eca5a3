"""Makes the stock `lm_eval --model kvzap_hf ...` work: registers the model when the running program is lm_eval.

Imported at interpreter startup by `kvzap_eval_lmeval.pth`; in any other program it only inspects `sys.argv`.
lm-eval's built-in models are imported first, so they stay registered (registering into an empty registry would
hide them), and registration is idempotent. In lm_eval it also runs the preflight of the command line
(`lm_eval_preflight.py`: kvzap_hf's default model made explicit, so that lm-eval's own tasks see it) and has the
KVzap summary printed under lm-eval's table (`lm_eval_summary.py`). Nothing in lm-eval is replaced.
"""

from __future__ import annotations

import os
import sys

MODEL_NAME = "kvzap_hf"
TARGET = "kvzap_eval.evaluation.lm_eval_model:KVzapHFLM"


def running_lm_eval(argv: list[str] | None = None) -> bool:
    """True for `lm_eval ...`, `lm-eval ...` and `python -m lm_eval ...`."""
    argv = list(getattr(sys, "orig_argv", sys.argv) if argv is None else argv)
    for i, arg in enumerate(argv[:4]):
        name = os.path.basename(arg)
        if name in ("lm_eval", "lm-eval") or (arg == "-m" and i + 1 < len(argv) and argv[i + 1] == "lm_eval"):
            return True
    return False


def register() -> None:
    """Register `kvzap_hf` in lm-eval's model registry as a lazy placeholder (no-op if already there)."""
    import lm_eval.models  # noqa: F401  (fills the registry with the built-in models first)
    from lm_eval.api.registry import model_registry

    model_registry.register(MODEL_NAME, target=TARGET)


def prepare_lm_eval() -> None:
    """The preflight of the stock lm_eval command line (before lm-eval reads it) and the summary at exit."""
    from .lm_eval_preflight import complete_and_remember
    from .lm_eval_summary import print_at_exit

    sys.argv[1:] = complete_and_remember(sys.argv[1:])
    print_at_exit()


if running_lm_eval():
    for step, what in ((register, f"register {MODEL_NAME} with lm-eval"), (prepare_lm_eval, "read the command line")):
        try:
            step()
        except Exception as exc:  # never break interpreter startup
            print(f"kvzap-eval: could not {what} ({exc})", file=sys.stderr)
