"""Adaptive dose search: the window's ceilings and triggers from a fraction of the dose grid.

The full sweep rolls out every candidate at every grid point of its dose grid, both signs. A
ceiling or a trigger is the *first* grid point (smallest ``|x|``) at which a condition holds on
the rollouts of that point, so most of the grid only confirms what its neighbours already show.
This module holds the search itself, with no model and no table: pure functions over grid indices
``0 .. n − 1`` (ascending ``|x|``) and predicate outcomes at the indices rolled out so far.

**One target.** A target is a predicate ``P(i)`` over grid indices, known only where index ``i``
has been rolled out. Its *path* is fixed by the outcomes along it:

1. galloping: indices ``0, 1, 3, 7, …, 2^k − 1`` (always ending at ``n − 1``) until the first one
   where ``P`` holds, ``g_k``; if ``P`` holds at none of them the path ends there;
2. bisection inside the bracket ``(g_{k−1}, g_k]``: ``mid = (lo + hi) // 2``, ``hi = mid`` where
   ``P(mid)`` holds, else ``lo = mid``, until ``hi = lo + 1``.

The path depends only on the outcomes at its own indices, never on indices another target (or
another neuron, or the batch) happened to roll out; outcomes already known are reused at no cost.
:func:`next_probe` replays the path over the known outcomes and returns the first index on it that
is still unknown.

**What the search returns.** For each target, :func:`first_visited`: the smallest *rolled-out*
index where the predicate holds (``None`` if it holds at none), over every index rolled out for
that (neuron, sign), whichever target asked for it. This is what the window's readout computes
from the sparse sweep table unchanged (the first crossing over the rows present), and:

* it is always an index where the predicate holds (never a point where the rollouts do not
  collapse or flip), and it is never below the full grid's first crossing (a subset of the grid
  can only find a later first crossing);
* every index on the target's own path below it was rolled out and does not satisfy ``P``; the
  path's own answer is a rising edge (``P(r − 1)`` false and rolled out, ``P(r)`` true);
* **if ``P`` is monotone over the grid** (false below some ``i*``, true from ``i*`` on, or never
  true), it equals the full grid's first crossing ``i*`` (and ``None`` iff the full grid has none):
  galloping finds the first gallop index at or above ``i*`` and bisection keeps
  ``P(lo)`` false, ``P(hi)`` true, so it ends at ``hi = i*``, and no rolled-out index below ``i*``
  can satisfy ``P``;
* if ``P`` is not monotone, it can be later than the full grid's first crossing (a run of grid
  points where ``P`` holds between two probes that miss it), but only at grid points that were not
  rolled out: :func:`unvisited_below` counts them, and when it is 0 the answer is the full grid's
  whatever the shape of ``P``.

**Several targets, several searches, one batch per round.** A (neuron, sign) carries several
targets (a ceiling, a trigger per horizon); a round rolls out, for every unfinished search, the
union of its targets' next probes, all searches together in one batched rollout; the outcomes of
that round decide the next probes (:func:`run_searches`). Rounds are few (about ``2·log2 n``), each
one batch; with ``gallop_at_once`` the first round rolls out every galloping index together (about
``1 + log2 n`` rounds, a few more points). Each round has a fixed cost (every prompt's prefix, the
decoding loop, the scoring), so fewer rounds can matter more than fewer rollouts.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "SEARCH_MODES",
    "gallop_indices",
    "next_probe",
    "first_visited",
    "unvisited_below",
    "is_monotone",
    "full_grid_first",
    "SearchState",
    "run_searches",
    "search_recorded",
]

#: ``window.search``: ``adaptive`` (this module) or ``full`` (every grid point).
SEARCH_MODES = ("adaptive", "full")


def gallop_indices(n: int) -> list[int]:
    """The galloping probes of a grid of ``n`` points: ``0, 1, 3, 7, …`` below ``n − 1``, then
    ``n − 1`` (the grid's edge is always probed unless the target is found before it)."""
    if n < 1:
        return []
    out, i = [], 1
    while i - 1 < n - 1:
        out.append(i - 1)
        i *= 2
    out.append(n - 1)
    return out


def next_probe(n: int, known: Mapping[int, bool]) -> int | None:
    """The next index whose outcome the target's path needs, or ``None`` when the path is complete.

    ``known[i]`` is the predicate at every rolled-out index ``i`` (other indices are unknown); the
    path (galloping, then bisection of the first bracket) is replayed over it."""
    prev = -1
    for g in gallop_indices(n):
        if g not in known:
            return g
        if known[g]:
            lo, hi = prev, g
            break
        prev = g
    else:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mid not in known:
            return mid
        if known[mid]:
            hi = mid
        else:
            lo = mid
    return None


def path_result(n: int, known: Mapping[int, bool]) -> int | None:
    """The path's own answer once complete: the top of the final bracket (``None`` if no gallop
    index satisfies the predicate). Raises if the path still needs a probe."""
    if next_probe(n, known) is not None:
        raise ValueError("the search path is not complete")
    prev = -1
    for g in gallop_indices(n):
        if known[g]:
            lo, hi = prev, g
            break
        prev = g
    else:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if known[mid] else (mid, hi)
    return hi


def first_visited(known: Mapping[int, bool]) -> int | None:
    """The smallest rolled-out index where the predicate holds (``None`` if none): what the
    search returns."""
    hits = [i for i, v in known.items() if v]
    return min(hits) if hits else None


def unvisited_below(n: int, visited: Sequence[int] | set[int], index: int | None) -> int:
    """Grid indices below ``index`` (below and at the edge ``n − 1`` when ``index`` is ``None``)
    that were not rolled out: 0 means the returned index is the full grid's, whatever the shape
    of the predicate."""
    top = n if index is None else index
    seen = {int(i) for i in visited}
    return sum(1 for i in range(top) if i not in seen)


def full_grid_first(outcomes: Sequence[bool]) -> int | None:
    """The first crossing on the full grid (every index known)."""
    return next((i for i, v in enumerate(outcomes) if v), None)


def is_monotone(outcomes: Sequence[bool]) -> bool:
    """False up to some index and true from there on (or never true)."""
    first = full_grid_first(outcomes)
    return first is None or all(outcomes[first:])


@dataclass
class SearchState:
    """The search of one (neuron, sign): ``n`` grid points, ``targets`` predicate names, and the
    outcomes of every rolled-out index (``outcomes[i][target]``)."""

    n: int
    targets: tuple[str, ...]
    outcomes: dict[int, dict[str, bool]] = field(default_factory=dict)
    #: roll out every galloping index in the first round (fewer rounds, at most a few more points:
    #: the gallop indices above the first bracket); the paths and what is returned are unchanged
    gallop_at_once: bool = False

    def known(self, target: str) -> dict[int, bool]:
        return {i: bool(o[target]) for i, o in self.outcomes.items()}

    def probes(self) -> list[int]:
        """The indices this search rolls out next (the union of its targets' next probes)."""
        if self.gallop_at_once and not self.outcomes:
            return gallop_indices(self.n)
        wanted = {next_probe(self.n, self.known(t)) for t in self.targets}
        return sorted(i for i in wanted if i is not None)

    def record(self, index: int, holds: Mapping[str, bool]) -> None:
        if not 0 <= index < self.n:
            raise ValueError(f"grid index {index} outside 0..{self.n - 1}")
        self.outcomes[int(index)] = {t: bool(holds[t]) for t in self.targets}

    @property
    def visited(self) -> list[int]:
        return sorted(self.outcomes)

    def result(self, target: str) -> int | None:
        """What the search returns for ``target``: :func:`first_visited`."""
        return first_visited(self.known(target))

    def path_result(self, target: str) -> int | None:
        return path_result(self.n, self.known(target))


def run_searches(
    searches: Mapping[Hashable, SearchState],
    evaluate: Callable[[list[tuple[Hashable, int]]], Mapping[tuple[Hashable, int], Mapping[str, bool]]],
    max_rounds: int = 1000,
) -> list[list[tuple[Hashable, int]]]:
    """Run every search to completion. Each round collects the next probes of every unfinished
    search, calls ``evaluate(points)`` once with all of them (one batched rollout) and records the
    outcomes it returns for each ``(key, index)``. Returns the points of each round."""
    rounds = []
    for _ in range(max_rounds):
        points = [(key, i) for key, s in searches.items() for i in s.probes()]
        if not points:
            return rounds
        outcomes = evaluate(points)
        for key, i in points:
            if (key, i) not in outcomes:
                raise ValueError(f"no outcome for search {key!r} at grid index {i}")
            searches[key].record(i, outcomes[(key, i)])
        rounds.append(points)
    raise RuntimeError(f"dose search did not finish within {max_rounds} rounds")


def search_recorded(recorded: Mapping[Hashable, Mapping[str, Sequence[bool]]],
                    gallop_at_once: bool = False) -> tuple[dict, list]:
    """The adaptive search run on recorded full-grid outcomes: ``recorded[key][target]`` is the
    predicate at every grid index. Returns ``(searches, rounds)``; only the probed indices are read."""
    searches = {}
    for key, targets in recorded.items():
        lengths = {len(v) for v in targets.values()}
        if len(lengths) != 1:
            raise ValueError(f"search {key!r}: every target needs the same grid")
        searches[key] = SearchState(lengths.pop(), tuple(targets), gallop_at_once=gallop_at_once)

    def evaluate(points):
        return {(k, i): {t: bool(v[i]) for t, v in recorded[k].items()} for k, i in points}

    return searches, run_searches(searches, evaluate)
