"""Which gradient each value of a lowered graph receives: the analysis behind Megatron's pairing.

A local graph has no DTensor to say what a gradient is, so the lowering works it out from the
outputs back. Each value that carries a gradient gets one placement for it: `Replicate` (every
rank holds the whole gradient), `Shard(d)` (its rows), or `Partial` (each rank a summand: a
replicated value read by sharded ops). A boundary's backward collective follows from the
placement its output's gradient has: an all-gather whose output gradient is partial is
reduce-scattered back, one whose gradient is whole is only sliced. A replicated value read both
by sharded ops (partial gradients) and by whole ones (a whole gradient) gets partial ones: the
whole gradient, divided by tp on its way back (`mixed`), is a summand too. A value that receives
gradients of two other placements has no single backward collective: `LoweringError`, and the
program stays on DTensors.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
from torch import fx
from torch.distributed.tensor import Partial, Replicate
from torch.distributed.tensor.placement_types import Placement

from autoshard.execute import dtensor_ops as ops
from autoshard.execute import local_ops as rt
from autoshard.graph.capture import Captured
from autoshard.schema.errors import PlanError
from autoshard.schema.placements import splits

REPLICATE, PARTIAL = Replicate(), Partial()


def carries_gradient(graph: fx.Graph, value_of: Callable[[fx.Node], object], captured: Captured) -> dict[fx.Node, bool]:
    """Does each node's value carry a gradient: floating values reached from a parameter or a user input."""
    params = set(captured.param_fqns)
    rg: dict[fx.Node, bool] = {}
    for node in graph.nodes:
        val = value_of(node)
        is_float = isinstance(val, torch.Tensor) and val.is_floating_point()
        if node.op == "placeholder":
            user_input = node.name in captured.user_input_placeholders
            rg[node] = is_float and (node.name in params or user_input)
        elif node.op == "call_function" and node.target is torch.ops.higher_order.wrap_with_set_grad_enabled:
            rg[node] = False
        elif node.op == "call_function" and node.target is operator.getitem:
            v = node.meta.get("val")
            rg[node] = rg.get(node.args[0], False) and isinstance(v, torch.Tensor) and v.is_floating_point()
        elif node.op in ("call_function", "call_module"):
            ok = is_float or isinstance(val, (tuple, list))
            rg[node] = ok and any(rg.get(a, False) for a in node.all_input_nodes)
        else:
            rg[node] = False
    return rg


def boundary_gradient(src, dst, gk: Placement | None, where: str, error: type[PlanError] = PlanError) -> Placement | None:
    """The gradient a planned boundary (`src` -> `dst`, its output's gradient `gk`) sends back."""
    if src is None or dst is None or src == dst and not src.is_replicate():
        return gk
    if src == REPLICATE and dst == REPLICATE:
        return REPLICATE if gk == PARTIAL else gk
    if src.is_shard() and dst == REPLICATE:
        return src
    if src.is_partial() and (dst.is_shard() and src == PARTIAL or dst == REPLICATE):  # Partial(avg): a norm's statistic
        return REPLICATE
    if src == REPLICATE and dst.is_shard():
        return PARTIAL
    raise error(f"{where}: no lowering for {src} -> {dst}")


def _writes_gradient(node: fx.Node, rg: dict) -> bool:
    """An in-place aten op writing into a value that carries a gradient."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    if not (schema and schema.arguments and node.args and isinstance(node.args[0], fx.Node)):
        return False
    alias = schema.arguments[0].alias_info
    return bool(alias and alias.is_write) and bool(rg.get(node.args[0]) or rg.get(node))


def _whole(p) -> bool:
    """A replicated value, or a multi-output op's replicated results (a split of one)."""
    return p == REPLICATE or isinstance(p, tuple) and all(q in (REPLICATE, None) for q in p) and REPLICATE in p


class GradientPlacements:
    """`run()`: node -> the placement of its gradient (None: no gradient), from the outputs back.

    `pl`: each node's forward placement (None: a plain value); `rg`: `carries_gradient`;
    `module_of(node)`: the runtime module a call_module node runs."""

    def __init__(self, graph: fx.Graph, pl: dict, rg: dict, sharded_outputs: set[str], module_of: Callable,
                 error: type[PlanError] = PlanError):
        self.graph, self.pl, self.rg, self.sharded, self.module_of, self.error = graph, pl, rg, sharded_outputs, module_of, error
        self.mixed: dict[fx.Node, list[fx.Node]] = {}  # replicated value -> users whose whole gradient is scaled to a summand
        # a write into a tensor that carries a gradient (RWKV's `output[:, t] = ...`) adds gradient
        # paths the dataflow edges do not show: mixed gradients are then left unreconciled
        self.writes = [n.name for n in graph.nodes if _writes_gradient(n, rg)]

    def run(self) -> dict[fx.Node, Placement | None]:
        gk: dict[fx.Node, Placement | None] = {}
        contrib: dict[fx.Node, dict[fx.Node, Placement]] = {}  # value -> {user: the gradient it sends back}
        for node in reversed(list(self.graph.nodes)):
            if node.op == "output":
                for a in node.all_input_nodes:
                    if self.rg.get(a):
                        contrib.setdefault(a, {})[node] = self.pl[a] if a.name in self.sharded and self.pl[a] is not None else REPLICATE
                continue
            kinds = set(contrib.get(node, {}).values())
            if kinds == {PARTIAL, REPLICATE} and _whole(self.pl.get(node)) and not self.writes:
                self.mixed[node] = [u for u, k in contrib[node].items() if k == REPLICATE]
                kinds = {PARTIAL}
            if len(kinds) > 1:
                raise self.error(f"{node.name} gets gradients laid out as {sorted(map(str, kinds))}: no single backward collective fits")
            gk[node] = next(iter(kinds)) if kinds and self.rg.get(node) else None
            if gk[node] is None:
                continue
            for a in node.all_input_nodes:
                if self.rg.get(a):
                    c = self.contribution(node, a, gk[node])
                    if c is not None:
                        contrib.setdefault(a, {})[node] = c
        return gk

    def contribution(self, user: fx.Node, inp: fx.Node, gk: Placement) -> Placement | None:
        """The placement of the gradient `user` sends back to its input `inp`."""
        src, out = self.pl.get(inp), self.pl.get(user)
        mod = self.module_of(user) if user.op == "call_module" else None
        if isinstance(mod, ops.Redistribute):
            return boundary_gradient(src, out, gk, user.name, self.error)
        if isinstance(mod, ops.ToReplicate):
            return REPLICATE  # a plain input: its gradient is reduced there if partial
        if isinstance(mod, ops.ToFull):
            return REPLICATE if src in (PARTIAL, None) else src
        if user.op == "call_function" and user.target in (rt.shard_local, rt.partition_value):
            return PARTIAL
        if user.op == "call_function" and user.target is operator.getitem:
            return gk
        if isinstance(out, tuple):
            out = next((p for p in out if p is not None), None)
        if src is None:
            return gk if out in (None, REPLICATE) else REPLICATE
        if splits(src):  # a fused weight's parts split alike
            if gk.is_partial():
                raise self.error(f"{inp.name} is sharded but {user.name} sends back partial gradients")
            return src
        if src.is_partial():
            if not gk.is_replicate():
                raise self.error(f"{inp.name} is a partial sum but {user.name} sends back {gk} gradients")
            return REPLICATE
        if out in (None, REPLICATE):
            return gk
        if gk.is_partial():
            raise self.error(f"{user.name} reads replicated {inp.name} into a {out} value with partial gradients")
        return PARTIAL  # a replicated value read by sharded ops: each rank holds a summand of its gradient
