"""The `graphfreeze` command line.

    graphfreeze --version
        graphfreeze's version, and the TensorFlow, Keras and Python it runs on

    graphfreeze demo [SCENARIO ...] [--list] [--verbose]
        run the seed scenarios, printing their freeze reports (the README's main job)

    graphfreeze inspect SCRIPT [--fn NAME] [--rule R ...] [--html OUT] [--dot OUT] [--json OUT]
                        [--tensorboard DIR] [--batchnorm-inference] [--verbose]
        trace and rewrite a step defined in SCRIPT, print the report and the diff

TensorFlow's native start-up logs (oneDNN, CPU features, CUDA probing, absl's notice) are
kept off the terminal unless --verbose is given (see graphfreeze/quiet.py).

The SCRIPT convention: a Python file that defines, at module level, the step (a function or
tf.function; `train_step` unless --fn says otherwise) and `example_args`, a tuple of
example arguments or a zero-argument callable returning one (optionally `example_kwargs`).
If the step is decorated with @gf.freeze and no --rule is given, its own rules are used.
Rules on the command line:

    'hidden1/*'                       a glob over variable paths
    'Rows(emb/embeddings, 0:100)'     rows (also Columns); indices as a:b, a:b:c, 3, or 1,5,7
    'Mask(out/kernel, mask.npy)'      a boolean array saved with numpy.save
    'Unfreeze(head/*)'                undo earlier rules (the argument may be Rows/Columns/Mask)
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import runpy
import sys
import time

from .quiet import native_stderr_silenced


class CliError(Exception):
    """A user mistake on the command line: one line on stderr, exit status 2."""


# ----------------------------------------------------------------------------- demo


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


# ----------------------------------------------------------------------------- rules

_CALL = re.compile(r"^\s*(Rows|Columns|Mask|Unfreeze)\s*\((.*)\)\s*$", re.S)


def _indices(text: str):
    text = text.strip().strip("[]()")
    try:
        if ":" in text:
            parts = [int(p) if p.strip() else None for p in text.split(":")]
            return slice(*parts)
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise CliError(f"cannot read indices {text!r}: write a:b, a:b:c, 7 or 1,5,7") from None
    if not values:
        raise CliError("empty index list")
    return values


def parse_rule(text: str):
    """A rule from its command-line spelling (see the module docstring)."""
    import numpy as np

    import graphfreeze as gf

    m = _CALL.match(text)
    if m is None:
        if not text.strip() or any(c in text for c in "()=,"):
            raise CliError(f"cannot parse rule {text!r}: expected a glob such as 'dense/*' or "
                           "Rows(path, 0:10), Columns(path, 1,2), Mask(path, file.npy), Unfreeze(...)")
        return text.strip()
    kind, body = m.group(1), m.group(2)
    if kind == "Unfreeze":
        return gf.Unfreeze(parse_rule(body))
    target, sep, rest = body.partition(",")
    if not sep or not target.strip():
        raise CliError(f"cannot parse rule {text!r}: {kind} takes a target and "
                       f"{'a .npy file' if kind == 'Mask' else 'indices'}, e.g. {kind}(dense/kernel, "
                       f"{'mask.npy' if kind == 'Mask' else '0:10'})")
    target = target.strip()
    if kind == "Mask":
        path = rest.strip()
        try:
            return gf.Mask(target, np.load(path))
        except OSError as e:
            raise CliError(f"cannot read mask file {path!r}: {e.strerror or e}") from None
    return getattr(gf, kind)(target, _indices(rest))


# ----------------------------------------------------------------------------- inspect


def _load_script(path: str, fn_name: str):
    if not os.path.isfile(path):
        raise CliError(f"no such script: {path}")
    try:
        namespace = runpy.run_path(path, run_name="graphfreeze_inspect")
    except SystemExit:
        raise CliError(f"{path} exited while being loaded; guard its script part with "
                       "if __name__ == '__main__'") from None
    except Exception as e:  # the user's script failed: one line, not a traceback
        raise CliError(f"running {path} failed: {type(e).__name__}: {e}") from None
    fn = namespace.get(fn_name)
    if fn is None or not callable(fn):
        defined = sorted(k for k, v in namespace.items() if callable(v) and not k.startswith("_"))
        raise CliError(f"{path} defines no function {fn_name!r} (pass --fn NAME; callables "
                       f"defined: {', '.join(defined[:8]) or 'none'})")
    args = namespace.get("example_args")
    if args is None:
        raise CliError(f"{path} defines no example_args (a tuple of example arguments for "
                       f"{fn_name}, or a function returning one)")
    if callable(args):
        args = args()
    kwargs = namespace.get("example_kwargs") or {}
    return fn, tuple(args) if isinstance(args, (list, tuple)) else (args,), dict(kwargs)


def cmd_inspect(args: argparse.Namespace) -> int:
    import graphfreeze as gf

    rules = [parse_rule(r) for r in args.rule or []]
    fn, example_args, example_kwargs = _load_script(args.script, args.fn)
    if isinstance(fn, gf.FrozenFunction):
        rules = rules or list(fn.rules)
        fn = fn.python_function
    if not rules:
        raise CliError(f"no rules: pass --rule (e.g. --rule 'dense/*'), or decorate {args.fn} "
                       "with @gf.freeze(...)")
    try:
        rw = gf.rewrite(fn, rules, *example_args, batchnorm_inference=args.batchnorm_inference,
                        **example_kwargs)
    except gf.FreezeError as e:
        raise CliError(" ".join(str(e).split())) from None
    report, diff = rw.report(), rw.diff()
    print(report)
    print()
    print(diff)
    outputs = []
    if args.html:
        outputs.append(rw.to_html(args.html))
    if args.dot:
        with open(args.dot, "w") as f:
            f.write(rw.to_dot())
        outputs.append(args.dot)
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump({"report": report.to_dict(), "diff": diff.to_dict()}, f, indent=2)
        outputs.append(args.json)
    if args.tensorboard:
        outputs += rw.to_tensorboard(args.tensorboard, include_original=True)
    for path in outputs:
        print(f"written {path}")
    return 0


# ----------------------------------------------------------------------------- main


def _version_text() -> str:
    """What a bug report needs: graphfreeze's version and the TensorFlow, Keras and Python it
    runs on (all already imported by the package, so this costs nothing)."""
    import platform

    import keras
    import tensorflow as tf

    from graphfreeze import __version__
    return (f"graphfreeze {__version__} (TensorFlow {tf.__version__}, Keras {keras.__version__}, "
            f"Python {platform.python_version()})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graphfreeze",
        description="Train only part of a TensorFlow 2 model by rewriting its traced graph.")
    parser.add_argument("--version", action="version", version=_version_text(),
                        help="print the graphfreeze, TensorFlow, Keras and Python versions and exit")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show TensorFlow's native logs (kept off the terminal by default)")
    # Also accepted after the command (graphfreeze demo --verbose); SUPPRESS keeps a flag
    # given before the command from being reset by the subcommand's default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show TensorFlow's native logs (kept off the terminal by default)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", parents=[common],
                          help="run the seed scenarios and print their freeze reports",
                          description="Run the seed scenarios (examples/), each printing its "
                                      "freeze report and checking its own claim.")
    demo.add_argument("scenarios", nargs="*", help="scenario names (default: all)")
    demo.add_argument("--list", action="store_true", help="list the scenarios and exit")
    demo.set_defaults(run=cmd_demo)

    inspect = sub.add_parser(
        "inspect", parents=[common], help="rewrite a step defined in a script and show what changed",
        description="Trace and rewrite the step a script defines; print the freeze report and "
                    "the diff, optionally writing HTML, DOT, JSON and TensorBoard views.",
        epilog="The script defines the step (train_step, or --fn NAME) and example_args (a tuple, "
               "or a function returning one) at module level. Rules: 'glob/*', "
               "'Rows(path, 0:10)', 'Columns(path, 1,2)', 'Mask(path, m.npy)', 'Unfreeze(...)'.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    inspect.add_argument("script", help="Python file defining the step and example_args")
    inspect.add_argument("--fn", default="train_step", help="name of the step (default: train_step)")
    inspect.add_argument("--rule", action="append", metavar="R",
                         help="a freeze rule (repeatable; default: the step's own @gf.freeze rules)")
    inspect.add_argument("--html", metavar="OUT", help="write a self-contained HTML report")
    inspect.add_argument("--dot", metavar="OUT", help="write the (collapsed) graph as DOT")
    inspect.add_argument("--json", metavar="OUT", help="write report and diff as JSON")
    inspect.add_argument("--tensorboard", metavar="DIR", help="write graphs for TensorBoard")
    inspect.add_argument("--batchnorm-inference", action="store_true",
                         help="run frozen BatchNorm in inference mode")
    inspect.set_defaults(run=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        with native_stderr_silenced(not args.verbose):
            return args.run(args)
    except CliError as e:
        print(f"graphfreeze: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
