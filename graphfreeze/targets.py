"""What a rule's target designates: a glob over variable paths (a whole path or any suffix
after a '/'), a variable, or a Keras layer / tf.Module (its weights and statistics, not the
RNG state of its dropout). A target that designates nothing the function reads is an error
naming the closest paths."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import RuleError
from .variables import VariableInfo, is_rng_state, module_variables, resource_variable, variable_path

if TYPE_CHECKING:
    from .rules import Rule

Target = Any  # a glob string, a variable, or a Keras layer / tf.Module


def describe_target(target: Target) -> str:
    if isinstance(target, str):
        return repr(target)
    if resource_variable(target) is not None:
        return f"variable {variable_path(target)!r}"
    name = getattr(target, "name", None) or type(target).__name__
    return f"layer {name!r}"


def check_target(target: Target, rule_name: str) -> None:
    if isinstance(target, str):
        if not target:
            raise RuleError(f"{rule_name}: an empty pattern matches nothing; give a variable "
                            "path glob such as 'dense/*'.")
        return
    if resource_variable(target) is not None or module_variables(target) is not None:
        return
    raise RuleError(
        f"{rule_name}: cannot use {target!r} ({type(target).__name__}) as a target; expected a "
        "glob over variable paths (str), a tf.Variable or Keras variable, or a Keras layer / "
        "tf.Module.")


def glob_matches(pattern: str, path: str) -> bool:
    if fnmatch.fnmatchcase(path, pattern):
        return True
    parts = path.split("/")
    return any(fnmatch.fnmatchcase("/".join(parts[i:]), pattern) for i in range(1, len(parts)))


def closest_paths(pattern: str, paths: Sequence[str], n: int = 3) -> list[str]:
    """Full paths whose whole text or a '/'-suffix looks most like `pattern`."""
    candidates: dict[str, str] = {}
    for path in paths:
        parts = path.split("/")
        for i in range(len(parts)):
            candidates.setdefault("/".join(parts[i:]), path)
    probe = pattern.replace("*", "").replace("?", "")
    best = difflib.get_close_matches(probe, list(candidates), n=4 * n, cutoff=0.0)
    out: list[str] = []
    for suffix in best:
        if candidates[suffix] not in out:
            out.append(candidates[suffix])
    return out[:n]


def match_target(target: Target, variables: Sequence[VariableInfo], rule: Rule) -> list[VariableInfo]:
    """The variables `target` designates among those the function reads; never empty."""
    if isinstance(target, str):
        # Optimizer and metric state are not weights: "*" must not freeze Adam's iteration
        # counter or a loss tracker.
        found = [v for v in variables if v.model_state and glob_matches(target, v.path)]
        if not found:
            model_paths = [v.path for v in variables if v.model_state]
            close = closest_paths(target, model_paths)
            hint = (f" Closest variable paths: {', '.join(repr(p) for p in close)}." if close
                    else " The function reads no model variable.")
            raise RuleError(
                f"rule {rule.describe()} matches no variable read by the function.{hint} A "
                "pattern matches a whole variable path or any suffix starting after a '/', "
                "e.g. 'hidden1/*' matches 'sequential/hidden1/kernel'.")
        return found
    # A variable named directly is taken as asked; a layer contributes its weights and
    # statistics, not the RNG state of its dropout (which would then repeat one mask).
    direct = resource_variable(target)
    wanted = [direct] if direct is not None else [
        resource_variable(v) for v in module_variables(target) or [] if not is_rng_state(v)]
    ids = {id(w) for w in wanted if w is not None}
    found = [v for v in variables if id(v.variable) in ids]
    if not ids:
        raise RuleError(f"rule {rule.describe()} names no weights or statistics to freeze (a "
                        "layer's RNG state is left alone so that dropout keeps drawing new masks); "
                        "remove the rule or name the layer that holds the weights.")
    if not found:
        raise RuleError(
            f"rule {rule.describe()} names {len(ids)} variable(s), none of which the function "
            f"reads; the function reads {len(variables)} variables, e.g. "
            f"{', '.join(repr(v.path) for v in variables[:3])}. Pass the layer or variable the "
            "traced step actually uses.")
    return found
