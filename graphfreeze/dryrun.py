"""`gf.plan`: resolve rules against a model's variables without tracing anything."""

from __future__ import annotations

from typing import Any

from .discovery import variables_of
from .report import Report, all_parameters, trainable_parameters, variable_rows
from .rules import RuleLike, as_rule, resolve
from .scale import resolve_scales
from .variables import (
    VariableInfo,
    is_keras_variable,
    metric_variables,
    resource_variable,
    variable_path,
)


def variable_infos(model_or_variables: Any) -> list[VariableInfo]:
    """The variables of a model, layer, tf.Module or list of variables, described as a
    trace would describe them (each once), without tracing anything."""
    metrics = {id(resource_variable(v)) for v in metric_variables(model_or_variables)}
    seen: set[int] = set()
    infos: list[VariableInfo] = []
    for v in variables_of(model_or_variables):
        var = resource_variable(v)
        assert var is not None, "variables_of returns variables only"
        if id(var) in seen:
            continue
        seen.add(id(var))
        infos.append(VariableInfo(
            path=variable_path(v), shape=tuple(var.shape.as_list()), dtype=var.dtype, variable=var,
            keras_variable=v if is_keras_variable(v) else None, placeholder="",
            trainable=bool(getattr(v, "trainable", var.trainable)), metric_state=id(var) in metrics))
    return infos


def plan(model_or_variables: Any, *rules: RuleLike) -> Report:
    """Check rules against a model in a second: the same per-variable table as a rewrite's
    report, without tracing a step (so no op counts, and no optimizer state to prune).

    >>> print(gf.plan(model, "hidden1/*", gf.Rows("emb/embeddings", ids)))   # doctest: +SKIP
    """
    infos = variable_infos(model_or_variables)
    rule_list = [as_rule(r) for r in rules]
    freezes = resolve(rule_list, infos)
    scales = resolve_scales(rule_list, infos, freezes)
    name = getattr(model_or_variables, "name", None) or type(model_or_variables).__name__
    return Report(str(name), "plan, nothing traced", variable_rows(freezes, {}, scales), {}, None, None,
                  trainable_parameters(infos, freezes), parameters_total=all_parameters(infos))
