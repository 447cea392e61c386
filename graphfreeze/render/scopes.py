"""Collapsing a large program's node names into about `budget` boxes by name scope.

Start from the step's top-level scopes and keep splitting the largest group into its
sub-scopes (a body's region into its own top-level scopes) while the picture stays under a
node budget, so a 15k-op ResNet50 step becomes ~40 boxes: one per residual block, one for
the backward pass, one for the optimizer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Set


def _prefix(name: str, depth: int) -> str:
    return "/".join(name.split("/")[:depth])


def _virtual_groups(key: str, children: dict[str, list[str]], room: int) -> dict[str, list[str]] | None:
    """Too many sibling scopes for the picture: group them by a shared '_'-prefix of their
    names (Keras names ResNet layers conv2_block1_1_conv, conv2_block1_2_conv, ...), as
    finely as `room` allows. None when no prefix length groups them usefully."""
    best = None
    for tokens in range(1, 5):
        grouped: dict[str, list[str]] = defaultdict(list)
        for child, members in children.items():
            last = child.rsplit("/", 1)[-1]
            grouped[f"{key}/{'_'.join(last.split('_')[:tokens])}*"].extend(members)
        if len(grouped) > room:
            break
        if 1 < len(grouped) < len(children):
            best = grouped
    return best


def _children(key: str, depth: int, members: list[str], roots: Set[str],
              ops: dict[str, str]) -> dict[str, list[str]]:
    """The next level of scopes under `key`. In a function's own top level (the step's, or a
    body's) many unscoped ops are grouped by their name's stem (gradient AddN_0..N), or by
    op type when their names share no stems (the numbered placeholders of captures)."""
    children: dict[str, list[str]] = defaultdict(list)
    for n in members:
        children[_prefix(n, depth + 1)].append(n)
    if key == "" or key in roots:
        direct = [n for n in members if n.count("/") == depth]
        if len(direct) > 8:
            stems = {n: n.rsplit("/", 1)[-1].split("_")[0] for n in direct}
            by_type = len(set(stems.values())) > max(8, len(direct) // 2)
            for n in direct:
                children[n].remove(n)
                if not children[n]:
                    del children[n]
                name = f"{ops[n]}*" if by_type else f"{stems[n]}*"
                children[f"{key}/{name}" if key else name].append(n)
    return children


def collapse(names: list[str], budget: int, roots: Set[str] = frozenset(),
              ops: dict[str, str] | None = None) -> dict[str, str]:
    """node -> group key: split scopes, largest first, while the picture fits `budget`.

    `roots` are the scopes that stand for function bodies: their own top level is split like
    the step's. A scope whose children are mostly single ops (an optimizer's flat scope of
    hundreds of arithmetic ops) stays one box: splitting it would add clutter, not
    structure. A scope with more child scopes than fit is split into groups of similarly
    named children.
    """
    if len(names) <= budget:
        return {n: n for n in names}
    groups: dict[str, list[str]] = {"": list(names)}
    depth = {"": 0}  # a virtual group keeps its parent's depth
    settled: set[str] = set()
    while True:
        candidates = [k for k, m in groups.items() if len(m) > 1 and k not in settled]
        if not candidates:
            break
        key = max(candidates, key=lambda k: len(groups[k]))
        d = depth[key]
        children = _children(key, d, groups[key], roots, ops or {})
        if len(children) == 1:  # a chain of single scopes: descend without splitting
            (child, members), = children.items()
            if child == key:
                settled.add(key)
                continue
            del groups[key]
            groups[child], depth[child] = members, d + 1
            continue
        new_depth = d + 1
        if key:  # the step's top level is always split: it is where the picture starts
            singles = sum(1 for m in children.values() if len(m) == 1)
            room = budget - len(groups) + 1
            if singles > 8 and singles * 2 > len(children):
                settled.add(key)
                continue
            if len(children) > room:
                virtual = _virtual_groups(key, children, room)
                if virtual is None:
                    settled.add(key)
                    continue
                children, new_depth = virtual, d
        del groups[key]
        for child, members in children.items():
            groups[child], depth[child] = members, new_depth
    return {n: k for k, members in groups.items() for n in members}
