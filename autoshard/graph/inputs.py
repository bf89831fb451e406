"""Binding a call to a captured program: what fills each graph input, and whether a call fits.

Every runner fills the graph's placeholders the same way (`program_sources`): parameters and
buffers from the module's state by FQN, constants from the export, user inputs in order.
`accepts` decides, strictly, whether a call's arguments are ones the program was captured for —
a program run outside what export proved is silently wrong: other arguments or non-tensor
values, another tensor dtype or rank, a size outside export's range constraints — including
sizes 0 and 1, which export lets through although it traced assuming >= 2 (a
`if x.shape[0] == 1` branch was decided for the example) — or another train/eval mode (dropout
is baked into the graph).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx
from torch.distributed.tensor import DTensor

from autoshard.graph.capture import Captured

STATE, CONST, INPUT = "state", "const", "input"


@dataclass(frozen=True)
class Source:
    """Where one graph input comes from."""

    kind: str       # STATE (a parameter or buffer), CONST (a constant of the export) or INPUT (the user's)
    name: str       # the placeholder's name in the captured (and rewritten, and lowered) graph
    target: Any     # STATE: the FQN; CONST: the value; INPUT: None
    parameter: bool = False


def program_sources(captured: Captured) -> list[Source]:
    """One Source per placeholder of `captured`'s graph, in placeholder order."""
    out = []
    for spec in captured.program.graph_signature.input_specs:
        kind = spec.kind.name
        if kind in ("PARAMETER", "BUFFER"):
            out.append(Source(STATE, spec.arg.name, spec.target, parameter=kind == "PARAMETER"))
        elif kind in ("CONSTANT_TENSOR", "CUSTOM_OBJ"):
            out.append(Source(CONST, spec.arg.name, captured.program.constants[spec.target]))
        else:
            out.append(Source(INPUT, spec.arg.name, None))
    return out


def accepts(captured: Captured, named: dict, training: bool | None = None) -> list | None:
    """The flat user inputs for this program, or None if it cannot take these arguments."""
    if training is not None and captured.training != training:
        return None
    named = {**named}
    for k, v in captured.constant_inputs.items():
        if k not in named:
            named[k] = v  # defaults autoshard added at capture (use_cache=False)
    if set(named) != set(captured.input_names) or any(named[k] != v for k, v in captured.constant_inputs.items() if not isinstance(v, torch.Tensor)):
        return None
    ordered = {k: named[k] for k in captured.input_names}
    flat, spec = pytree.tree_flatten(((), ordered))
    if spec != captured.program.call_spec.in_spec:
        return None
    placeholders = [n for n in captured.program.graph.nodes if n.op == "placeholder" and n.name in captured.user_input_placeholders]
    try:
        from torch._export.utils import _check_input_constraints_for_graph

        paths = pytree.tree_flatten_with_path(((), ordered))[0]
        _check_input_constraints_for_graph(placeholders, paths, captured.program.range_constraints)
    except Exception:  # noqa: BLE001 - any violated guard means: capture again for these shapes
        return None
    if not _same_dtypes(placeholders, flat) or not _within_ranges(placeholders, flat, captured.program.range_constraints):
        return None
    return [v.full_tensor() if isinstance(v, DTensor) else v for v in flat]


def _same_dtypes(placeholders: list[fx.Node], flat: list) -> bool:
    """Export's dtype asserts are erased from the rewritten graph; a mask passed as bool instead of
    int64 (or a bf16 `inputs_embeds` into an fp32 capture) takes another path: capture again."""
    for node, arg in zip(placeholders, flat):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and isinstance(arg, torch.Tensor) and val.dtype != arg.dtype:
            return False
    return True


def _within_ranges(placeholders: list[fx.Node], flat: list, ranges: dict) -> bool:
    """Every symbolic size inside export's range, lower bound included.

    `torch.export` deliberately lets sizes 0 and 1 through its own check although it traced
    assuming >= 2: a branch on `size == 1` (or a broadcast) was decided for the example, so a
    batch of 1 could run the wrong code. Such a call is captured again instead.
    """
    import sympy
    from torch._export.passes.add_runtime_assertions_for_constraints_pass import _convert_range_to_int

    for node, arg in zip(placeholders, flat):
        val = node.meta.get("val")
        if not (isinstance(val, torch.Tensor) and isinstance(arg, torch.Tensor)):
            continue
        for size, actual in zip(val.shape, arg.shape):
            if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol) and size.node.expr in ranges:
                low, high = _convert_range_to_int(ranges[size.node.expr])
                if not low <= int(actual) <= high:
                    return False
    return True
