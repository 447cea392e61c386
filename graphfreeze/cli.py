"""The `graphfreeze` command line.

    graphfreeze demo              run the seed scenarios, printing their freeze reports
    graphfreeze demo --list       list them
    graphfreeze demo seed001...   run some of them
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class CliError(Exception):
    """A user mistake on the command line: one line on stderr, exit status 2."""


def _scenarios() -> list[str]:
    from graphfreeze.examples import SCENARIOS
    return list(SCENARIOS)


def cmd_demo(args: argparse.Namespace) -> int:
    names = _scenarios()
    if args.list:
        print("\n".join(names))
        return 0
    chosen = args.scenarios or names
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise CliError(f"unknown scenario {unknown[0]!r}; choose from: {', '.join(names)}")
    failed = []
    for name in chosen:
        print(f"=== {name} " + "=" * max(0, 70 - len(name)))
        start = time.perf_counter()
        module = importlib.import_module(f"graphfreeze.examples.{name}")
        status = module.main()
        print(f"--- {name}: {'ok' if status == 0 else 'FAILED'} "
              f"({time.perf_counter() - start:.1f} s)\n")
        if status:
            failed.append(name)
    if failed:
        print(f"{len(failed)} scenario(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"all {len(chosen)} scenario(s) hold their claims")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graphfreeze",
        description="Train only part of a TensorFlow 2 model by rewriting its traced graph.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="run the seed scenarios and print their freeze reports",
                          description="Run the seed scenarios (examples/), each printing its "
                                      "freeze report and checking its own claim.")
    demo.add_argument("scenarios", nargs="*", help="scenario names (default: all)")
    demo.add_argument("--list", action="store_true", help="list the scenarios and exit")
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except CliError as e:
        print(f"graphfreeze: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
