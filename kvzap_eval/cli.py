"""The `kvzap-eval` command: subcommands for the demo (and, as they land, evaluation, latency, sweeps, gates)."""

from __future__ import annotations

import sys

from .errors import KVzapError

SUBCOMMANDS = {"demo": "kvzap_eval.demo", "bench": "kvzap_eval.bench"}


def main(argv: list[str] | None = None) -> int:
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        print(f"usage: kvzap-eval {{{','.join(SUBCOMMANDS)}}} [options]  (kvzap-eval <cmd> --help)", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]])
    try:
        return module.main(argv[1:])
    except KVzapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
