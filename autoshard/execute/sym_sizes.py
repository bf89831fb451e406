"""Symbolic sizes in a lowered graph: a global size computed from the graph's own inputs.

On local tensors `x.size(d)` of a sharded dim is the shard's size, so wherever the DTensor
program used a global size (a view's target shape, an all-gather's output length) the lowering
needs it as a value: an int when export fixed it, else nodes that compute its sympy expression
from the `sym_size` of an input that carries the symbol (inserted once, after the last input).
"""

from __future__ import annotations

import operator

import sympy
import torch
from torch import fx
from torch.utils._sympy.functions import FloorDiv, Mod

from autoshard.schema.errors import PlanError

aten = torch.ops.aten
_OPS = {sympy.Add: operator.add, sympy.Mul: operator.mul, FloorDiv: operator.floordiv, Mod: operator.mod}


class SizeEmitter:
    """`size_of(size)`: an int, or a node of `graph` (before `anchor`) computing `size`."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node, error: type[PlanError] = PlanError):
        self.graph, self.anchor, self.error = graph, anchor, error
        self._sizes: dict = {}

    def size_of(self, size):
        if not isinstance(size, torch.SymInt):
            return int(size)
        expr = size.node.expr
        if expr.is_number:
            return int(expr)
        if expr not in self._sizes:
            self._sizes[expr] = self._emit(expr)
        return self._sizes[expr]

    def _emit(self, expr):
        if expr.is_Integer:
            return int(expr)
        if expr.is_Symbol:
            return self._symbol(expr)
        args = [self._emit(a) for a in expr.args]
        op = _OPS.get(type(expr))
        if op is None:
            raise self.error(f"size {expr} has no lowering")
        value = args[0]
        for a in args[1:]:
            with self.graph.inserting_before(self.anchor):
                value = self.graph.call_function(op, (value, a))
        return value

    def _symbol(self, sym):
        for node in self.graph.nodes:
            if node.op != "placeholder":
                continue
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                for d, s in enumerate(val.shape):
                    if isinstance(s, torch.SymInt) and s.node.expr == sym:
                        with self.graph.inserting_before(self.anchor):
                            return self.graph.call_function(aten.sym_size.int, (node, d))
        raise self.error(f"size symbol {sym} is not the size of any input")
