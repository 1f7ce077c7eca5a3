"""The `kvzap-eval` command: our subcommands, and otherwise lm-eval's own CLI with `kvzap_hf` registered.

kvzap-eval demo ...                                   # a KVzap generation demo
kvzap-eval --model kvzap_hf --model_args threshold=-5 --tasks ...   # exactly lm_eval's arguments
"""

from __future__ import annotations

import importlib
import sys

from .errors import exit_code

SUBCOMMANDS = {
    "demo": "kvzap_eval.tools.demo",
    "bench": "kvzap_eval.tools.bench",
    "latency": "kvzap_eval.tools.latency",
    "sweep": "kvzap_eval.evaluation.sweep",
    "sweep-bench": "kvzap_eval.tools.sweep_bench",
    "merge": "kvzap_eval.evaluation.sweep:merge_main",
    "report": "kvzap_eval.evaluation.report",
    "compare": "kvzap_eval.evaluation.compare",
    "gate": "kvzap_eval.tools.gate",
    "train": "kvzap_eval.train.pipeline",
}


def run_lm_eval(argv: list[str]) -> int:
    """lm-eval's CLI on `argv`, with `kvzap_hf` registered, its default model made explicit, tasks that cannot run
    offline refused before anything loads, and the KVzap summary printed under lm-eval's table."""
    from .evaluation.lm_eval_hook import register
    from .evaluation.lm_eval_preflight import check_current_command, complete_and_remember
    from .evaluation.lm_eval_summary import print_pending

    register()
    argv = complete_and_remember(argv)
    check_current_command()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    print_pending()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print(f"subcommands: {', '.join(SUBCOMMANDS)} (kvzap-eval <subcommand> --help); anything else goes to lm_eval")
        return 0
    if argv and argv[0] in SUBCOMMANDS:
        module, _, function = SUBCOMMANDS[argv[0]].partition(":")
        return exit_code(lambda: getattr(importlib.import_module(module), function or "main")(argv[1:]))
    return exit_code(lambda: run_lm_eval(argv))


if __name__ == "__main__":
    sys.exit(main())
