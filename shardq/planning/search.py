"""The planner's complete search: a depth-first search over every unit's choices (device, and for blocks on the
CPU whether they stream or compute there), pruned by the budgets and by symmetry.

The greedy fill (`planner._place`) finds a good placement quickly but can miss one that fits (a head that only
fits computed on the CPU, blocks that fit only out of order). When it finds none, this search decides: the
budget check of a partial placement never decreases as units are added (sums and maxima of non-negative
terms), so a partial placement over budget prunes its whole subtree; units with the same signature (identical
decoder layers) are interchangeable, so their choices are taken in non-decreasing order. On small models the
search is exhaustive (the tests compare it with brute force); `node_limit` bounds it on large ones.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class SearchResult:
    """What the search returns: each unit's choice (by unit name), and whether it explored every branch."""

    choices: dict[str, Any] | None
    complete: bool
    nodes: int


def search(
    names: Sequence[str],
    options: Callable[[str], list[Any]],
    signature: Callable[[str], Hashable],
    fits: Callable[[dict[str, Any]], bool],
    node_limit: int = 200_000,
) -> SearchResult:
    """The first assignment of one option per name (options in preference order) for which `fits` holds on the
    whole assignment; `fits` is also asked about every partial assignment and must be monotone (a partial
    assignment that does not fit cannot be completed)."""
    order = sorted(names, key=lambda n: (str(signature(n)), names.index(n)))
    chosen: dict[str, Any] = {}
    index: dict[str, int] = {}
    nodes = 0
    exhausted = True

    def dfs(i: int) -> bool:
        nonlocal nodes, exhausted
        if i == len(order):
            return True
        name = order[i]
        opts = options(name)
        lo = index[order[i - 1]] if i and signature(order[i - 1]) == signature(name) else 0  # symmetry
        for k in range(lo, len(opts)):
            nodes += 1
            if nodes > node_limit:
                exhausted = False
                return False
            chosen[name], index[name] = opts[k], k
            if fits(chosen) and dfs(i + 1):
                return True
            del chosen[name], index[name]
        return False

    found = dfs(0)
    return SearchResult(dict(chosen) if found else None, exhausted or found, nodes)
