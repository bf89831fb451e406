"""Each region's strategies, priced; and the exact solver that picks one per region.

A *layout* is what the residual stream between regions looks like: `Shard(seq)` (sequence
parallel) or `Replicate`. Under a layout every region has a few legal strategies:

    region             replicated stream               sequence-parallel stream
    column -> row      replicate | tp (all-reduce)     tp_sp (all-gather in, reduce-scatter out)
    embedding          replicate | vocab (all-reduce)  vocab (reduce-scatter)
    LM head            replicate | column + loss parallel | column + gather (input all-gathered)

Regions are separated by explicit boundaries, so a node's placement depends only on its own
region's strategy and the layout: pricing the two extreme plans of a layout (all sharded, all
replicated) with the placement simulator prices every mix, node by node. Step time and per-rank
memory then add up over regions, and the choice is a multiple-choice knapsack: minimise time with
memory under a budget. `solve` does it exactly: identical regions (the layers of a stack) are
grouped, each group contributes every count split, and a Pareto frontier (memory, time) is
carried from group to group, keeping only points no other point beats on both.

    >>> best = solve(layout, budget)   # Solution(choice=[...], time_s, memory)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations_with_replacement

from autoshard.cost.memory import MemoryBreakdown


@dataclass
class Option:
    """One strategy of one region, priced on its own (the region's nodes, boundaries, params)."""

    name: str                      # replicate | tp | tp_sp | vocab_parallel | loss_parallel | gather
    sharded: bool
    time_s: float = 0.0            # forward + backward: compute + communication
    compute_s: float = 0.0
    comm_s: float = 0.0
    memory: MemoryBreakdown = field(default_factory=MemoryBreakdown)
    comm: dict = field(default_factory=dict)   # collective -> bytes per step
    extra_boundaries: dict = field(default_factory=dict)
    note: str = ""
    parts: tuple = ()              # for coupled regions (a tied table): one option per region

    def key(self) -> tuple:
        return (self.name, round(self.time_s, 15), self.memory.total)


@dataclass
class LayoutCosts:
    layout: str                          # "sequence_parallel" | "replicated"
    viable: bool = True
    why: str = ""
    stream_time_s: float = 0.0
    stream_compute_s: float = 0.0
    stream_comm_s: float = 0.0
    stream_memory: MemoryBreakdown = field(default_factory=MemoryBreakdown)
    options: list[list[Option]] = field(default_factory=list)   # per chosen region
    units: list[list[int]] = field(default_factory=list)        # regions that must agree (tied)

    def unit_options(self) -> list[list[Option]]:
        """Options per unit: a lone region's own, or the consistent combinations of coupled regions
        (all sharded or all replicated: a tied table has one placement)."""
        out = []
        for unit in self.units or [[i] for i in range(len(self.options))]:
            if len(unit) == 1:
                out.append(self.options[unit[0]])
                continue
            combos = [()]
            for i in unit:
                combos = [c + (o,) for c in combos for o in self.options[i] if not c or o.sharded == c[0].sharded]
            out.append([Option("+".join(o.name for o in c), c[0].sharded, sum(o.time_s for o in c), sum(o.compute_s for o in c),
                               sum(o.comm_s for o in c), sum((o.memory for o in c), MemoryBreakdown()), parts=c) for c in combos])
        return out


@dataclass
class Solution:
    layout: str
    choice: list[int]
    time_s: float
    memory: int


def _frontier(points: list[tuple[int, float, tuple]]) -> list[tuple[int, float, tuple]]:
    """Pareto-minimal (memory, time) points, sorted by memory."""
    points.sort(key=lambda p: (p[0], p[1]))
    out: list[tuple[int, float, tuple]] = []
    best = math.inf
    for p in points:
        if p[1] < best - 1e-15:
            out.append(p)
            best = p[1]
    return out


def solve(costs: LayoutCosts, budget: float) -> Solution | None:
    """The fastest choice of one option per region with total memory <= budget (None if none fits).

    Exact: regions whose option lists are identical form a group; a group of `n` regions with `k`
    options contributes every multiset of `n` options (C(n+k-1, k-1) points, Pareto-pruned), and
    groups are merged keeping the (memory, time) Pareto frontier.
    """
    options = costs.unit_options()
    groups: dict[tuple, list[int]] = {}
    for i, opts in enumerate(options):
        groups.setdefault(tuple(o.key() for o in opts), []).append(i)
    base_mem = costs.stream_memory.total
    frontier: list[tuple[int, float, tuple]] = [(base_mem, costs.stream_time_s, ())]
    for sig, members in groups.items():
        opts = options[members[0]]
        local = []
        for combo in combinations_with_replacement(range(len(opts)), len(members)):
            mem = sum(opts[j].memory.total for j in combo)
            t = sum(opts[j].time_s for j in combo)
            local.append((mem, t, combo))
        local = _frontier(local)
        merged = [(m1 + m2, t1 + t2, c1 + ((tuple(members), c2),)) for m1, t1, c1 in frontier for m2, t2, c2 in local]
        frontier = _frontier([p for p in merged if p[0] <= budget])
        if not frontier:
            return None
    mem, t, picks = frontier[-1] if frontier else (0, 0.0, ())
    # the fastest feasible point is the last of the frontier (time decreases along it)
    unit_choice = [0] * len(options)
    for members, combo in picks:
        # identical units are interchangeable: give the sharded options to the first ones
        for i, j in zip(members, sorted(combo, key=lambda j: -options[members[0]][j].sharded)):
            unit_choice[i] = j
    choice = [0] * len(costs.options)
    for u, unit in enumerate(costs.units or [[i] for i in range(len(costs.options))]):
        o = options[u][unit_choice[u]]
        for i, part in zip(unit, o.parts or (o,)):
            choice[i] = costs.options[i].index(part)
    return Solution(costs.layout, choice, t, mem)


def min_memory(costs: LayoutCosts) -> int:
    return costs.stream_memory.total + sum(min(o.memory.total for o in opts) for opts in costs.unit_options())


def expert_parallel_decided(costs: LayoutCosts) -> LayoutCosts:
    """The layout's options with each MoE block's expert parallel settled on its own: kept (and
    the block's other options dropped) where it is faster than the option the smallest-memory
    default would pick for that block and holds no more memory, else left out. Decided per block,
    EP frees no memory for other regions to spend, so the default plan stays the same choice per
    layer whatever the depth (the fast planner grows 4 layers to all)."""
    from dataclasses import replace

    def settle(opts):
        ep = [o for o in opts if o.name == "ep"]
        rest = [o for o in opts if o.name != "ep"]
        if not ep or not any(o.sharded for o in rest):
            return opts
        default = min(rest, key=lambda o: (o.memory.total, o.time_s))
        return ep if ep[0].time_s < default.time_s and ep[0].memory.total <= default.memory.total else rest

    return replace(costs, options=[settle(opts) for opts in costs.options])


def solve_subset(full: LayoutCosts, subset: LayoutCosts, budget: float) -> Solution | None:
    """`solve` over `subset`'s options (some of `full`'s, as `expert_parallel_decided` keeps),
    its choice given as indices into `full`'s, so every option is still shown with the plan."""
    sol = solve(subset, budget)
    if sol is None or subset is full:
        return sol
    choice = [full.options[i].index(subset.options[i][j]) for i, j in enumerate(sol.choice)]
    return Solution(sol.layout, choice, sol.time_s, sol.memory)
