"""Matching two call-site graphs from the inputs down, and the diagnostics that say why a
layer did not match."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import networkx as nx

from .callgraph import _MATCHABLE_ROOTS, _Graph, _Site
from .results import LayerPair, MatchReport, Ref, Unmatched


@dataclass
class _Matching:
    mapping: dict[str, str]        # target key -> source key
    reasons: dict[str, str]        # target key -> why it did not match
    after: dict[str, str]          # target key -> the unmatched inbound key that stopped it


def _same(s: _Site, t: _Site) -> bool:
    return (s.kind, s.config, s.call, s.weights) == (t.kind, t.config, t.call, t.weights)


def _match(source: _Graph, target: _Graph, excluded: set[int]) -> _Matching:
    by_inputs: dict[tuple[Ref, ...], list[str]] = defaultdict(list)
    for key in source.order:
        by_inputs[source.site(key).inputs].append(key)
    m = _Matching({}, {}, {})
    taken: set[str] = set()
    for key in nx.topological_sort(target.nx):
        site = target.site(key)
        if site.layer is not None and id(site.layer) in excluded:
            m.reasons[key] = "excluded by the caller"
            continue
        stopped = next((p for p, _ in site.inputs if p not in m.mapping), None)
        if stopped is not None:
            m.after[key] = stopped
            continue
        expected = tuple((m.mapping[p], i) for p, i in site.inputs)
        if site.inputs:
            candidates = by_inputs.get(expected, [])
        else:
            candidates = [key] if site.kind in _MATCHABLE_ROOTS and key in source else []
        free = [c for c in candidates if c not in taken]
        hit = next((c for c in free if _same(source.site(c), site)), None)
        if hit is None:
            m.reasons[key] = _why(source, site, expected, candidates, free)
            continue
        m.mapping[key] = hit
        if site.kind != "constant":   # one constant may feed any number of ops
            taken.add(hit)
    return m


def _why(source: _Graph, site: _Site, expected: tuple[Ref, ...], candidates: list[str],
         free: list[str]) -> str:
    if not candidates:
        return _no_candidate(source, site, expected)
    if not free:
        names = ", ".join(repr(source.site(c).label) for c in candidates)
        return f"its source counterpart ({names}) is already matched to another target call"
    sites = [source.site(c) for c in free]
    s = next((x for x in sites if x.kind == site.kind), sites[0])
    where = f"source {s.label!r}"
    if s.kind != site.kind:
        return f"layer kind differs: {_short_kind(s.kind)} in the {where}"
    if s.config != site.config:
        keys = sorted(set(s.config) | set(site.config), key=lambda k: (k not in site.config, k))
        k = next(x for x in keys if s.config.get(x) != site.config.get(x))
        return (f"config differs: {k} = {site.config.get(k, '(unset)')} here, "
                f"{s.config.get(k, '(unset)')} in the {where}")
    if s.call != site.call:
        return f"call arguments differ: {site.call} here, {s.call} in the {where}"
    return _weights_differ(s, site, where)


def _weights_differ(s: _Site, t: _Site, where: str) -> str:
    if [v[0] for v in s.weights] != [v[0] for v in t.weights]:
        return (f"weights differ: {[v[0] for v in t.weights]} here, "
                f"{[v[0] for v in s.weights]} in the {where}")
    for (name, ts, td), (_, ss, sd) in zip(t.weights, s.weights):
        if ts != ss:
            return f"shape differs: {name} {list(ts)} here, {list(ss)} in the {where}"
        if td != sd:
            return f"dtype differs: {name} {td} here, {sd} in the {where}"
    return f"differs from the {where}"


def _no_candidate(source: _Graph, site: _Site, expected: tuple[Ref, ...]) -> str:
    if not site.inputs:
        return f"no candidate: the source has no {site.label}"
    producers = list(dict.fromkeys(p for p, _ in expected))
    labels = ", ".join(repr(source.site(p).label) for p in producers)
    readers = sorted({c for p in producers for c in source.nx.successors(p)}, key=source.order.index)
    if not readers:
        return f"no candidate: nothing in the source reads the output of {labels}"
    names = ", ".join(repr(source.site(c).label) for c in readers[:3])
    return (f"inbound layers differ: no source call reads ({labels}) in these positions; "
            f"in the source they feed {names}")


def _short_kind(kind: str) -> str:
    return kind.rsplit(".", 1)[-1]


def _root_cause(m: _Matching, key: str) -> str:
    """The first unmatched node upstream of `key` whose own inputs all matched."""
    while key in m.after:
        key = m.after[key]
    return key


def _unmatched_reason(target: _Graph, m: _Matching, keys: list[str]) -> tuple[str, str | None]:
    """Why a target layer (all its call sites `keys`) was left, and the node to blame."""
    missing = next((k for k in keys if k not in m.mapping), None)
    if missing is None:
        return "its calls match different source layers (weights shared here, not there)", None
    cause = _root_cause(m, missing)
    if cause == missing:
        return m.reasons[cause], cause
    return f"after {target.site(cause).label!r}, which did not match", cause


def _report(source: _Graph, target: _Graph, m: _Matching, source_desc: str) -> MatchReport:
    calls: dict[int, list[str]] = defaultdict(list)
    for key in target.order:
        if target.site(key).layer is not None:
            calls[id(target.site(key).layer)].append(key)
    pairs, unmatched, blamed = [], [], set()
    for keys in calls.values():
        t = target.site(keys[0])
        owners = {id(source.site(m.mapping[k]).layer) for k in keys if k in m.mapping}
        if len(owners) == 1 and all(k in m.mapping for k in keys):
            if t.weights:
                pairs.append(LayerPair(source.site(m.mapping[keys[0]]).layer, t.layer, t.weights))
        elif t.weights:
            reason, cause = _unmatched_reason(target, m, keys)
            blamed.add(cause)
            unmatched.append(Unmatched(t.label, _short_kind(t.kind), reason, True, t.layer))
    # A weightless node where the match stopped explains the layers after it: show it too.
    for key in target.order:
        site = target.site(key)
        if key in blamed and not site.weights:
            unmatched.append(Unmatched(site.label, _short_kind(site.kind), m.reasons[key], False,
                                       site.layer))
    structure = [(source.site(s).label, target.site(t).label, _short_kind(target.site(t).kind))
                 for t, s in m.mapping.items() if target.site(t).layer is not None]
    return MatchReport(source_desc, target.name, source.method, pairs, structure, unmatched,
                       target_sites=sum(1 for k in target.order if target.site(k).layer is not None))
