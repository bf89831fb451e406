"""What the lowering hands the runner: the local graph and how to call it.

Parameters enter as `to_local(grad_placements=...)` of their DTensors, user inputs unchanged
(their symbolic dims marked dynamic when compiled); sharded outputs leave as DTensors of their
global shape; `collectives` lists every collective with its backward, for `print(lowered)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx
from torch.distributed.tensor import Partial, Shard
from torch.distributed.tensor.placement_types import Placement

from autoshard.execute import local_ops as rt
from autoshard.graph.capture import Captured
from autoshard.schema.errors import PlanError

COLLECTIVES = (rt.all_gather, rt.reduce_scatter, rt.all_reduce, rt.reduce_grad)


@dataclass
class LoweredProgram:
    """A graph of plain tensors and how to call it (placeholders in export order)."""

    graph_module: fx.GraphModule
    grad_placements: dict[str, tuple[Placement, ...]]   # parameter FQN -> to_local(grad_placements=)
    outputs: list[tuple[int, tuple[Placement, ...]] | None]  # per output: None, or (dim, placements) of a sharded one
    output_sizes: list[tuple | None]                     # global sizes of sharded outputs (static)
    dynamic_dims: dict[str, list[int]]                   # user input placeholder -> symbolic dims
    collectives: list[str] = field(default_factory=list)  # one line per collective, in graph order

    def __str__(self) -> str:
        return "\n".join(self.collectives)


def wrap_output(out, spec, size, mesh):
    """A lowered program's output as the caller sees it: a sharded one as a DTensor of its global
    shape (`spec`: (dim, placements); `size`: the global size of that dim), others unchanged."""
    if spec is None or not isinstance(out, torch.Tensor):
        return out
    from torch.distributed.tensor import DTensor

    dim, placements = spec
    shape = list(out.shape)
    shape[dim] = size
    stride = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        stride[i] = stride[i + 1] * shape[i + 1]
    return DTensor.from_local(out, mesh, placements, run_check=False, shape=torch.Size(shape), stride=tuple(stride))


def sharded_outputs(graph: fx.Graph, pl: dict, value_of: Callable, sharded: set[str], error: type[PlanError] = PlanError):
    """Per graph output: None, or (dim, placements) of an output the plan keeps sharded; and its global size."""
    out_node = next(n for n in graph.nodes if n.op == "output")
    outputs, sizes = [], []
    for a in list(out_node.args[0]):
        p = pl.get(a) if isinstance(a, fx.Node) else None
        if isinstance(a, fx.Node) and a.name in sharded and isinstance(p, (Shard, Partial)):
            val = value_of(a)
            if p.is_partial() or isinstance(val.shape[p.dim], torch.SymInt):
                raise error(f"sharded output {a.name} ({p}) has a symbolic sharded dim")
            outputs.append((p.dim, (p,)))
            sizes.append(int(val.shape[p.dim]))
        else:
            outputs.append(None)
            sizes.append(None)
    return outputs, sizes


def param_grad_placements(graph: fx.Graph, captured: Captured, pl: dict, gk: dict) -> dict[str, tuple[Placement, ...]]:
    """Parameter FQN -> the placement of the gradient its local shard receives."""
    out = {}
    for node in graph.nodes:
        fqn = captured.param_fqns.get(node.name) if node.op == "placeholder" else None
        if fqn is None or pl.get(node) is None:
            continue
        out[fqn] = (gk.get(node) if gk.get(node) is not None else pl[node],)
    return out


def dynamic_dims(graph: fx.Graph, captured: Captured) -> dict[str, list[int]]:
    """User input placeholder -> its dims that export kept symbolic."""
    dims = {}
    for node in graph.nodes:
        if node.op == "placeholder" and node.name in captured.user_input_placeholders:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                dims[node.name] = [d for d, s in enumerate(val.shape) if isinstance(s, torch.SymInt)]
    return dims


def describe_collectives(graph: fx.Graph) -> list[str]:
    lines = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target in COLLECTIVES:
            back = {rt.all_gather: node.args[-1] if node.args else "", rt.reduce_scatter: "all_gather",
                    rt.all_reduce: "all_reduce" if len(node.args) > 2 and node.args[2] else "-",
                    rt.reduce_grad: "all_reduce"}[node.target]
            lines.append(f"{node.name}: {node.target.__name__}({node.args[0].name}) backward: {back}")
    return lines
