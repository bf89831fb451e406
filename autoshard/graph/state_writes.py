"""Module state forward writes in place (a KV cache), and how such a write can be sharded.

A cache buffer takes the placement of the keys/values written into it: heads split with the
attention (each rank stores only its heads), whole when K/V are replicated. The write then runs
on each rank's local shards, exactly, when it addresses only dims that are not split
(`index_copy_` along the sequence, `index_put_` with no index on the split dim) and the buffer's
split dim has the written value's size. Anything else keeps the buffer whole and must write
replicated values (`execute/rewrite._reject_mutations` refuses the rest).
"""

from __future__ import annotations

import torch
from torch import fx
from torch.distributed.tensor.placement_types import Placement

from autoshard.graph.simplify import view_root

aten = torch.ops.aten
LOCAL_WRITES = frozenset({aten.index_copy_.default, aten.index_put_.default})


def written_placeholder(node: fx.Node) -> fx.Node | None:
    """The graph input an in-place op writes (through views of it), if any."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    schema = node.target._schema
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = view_root(node.args[i] if i < len(node.args) else node.kwargs.get(arg.name))
            if isinstance(value, fx.Node) and value.op == "placeholder":
                return value
    return None


def written_value(node: fx.Node) -> fx.Node | None:
    """What a local write stores: `index_copy_`'s source, `index_put_`'s values."""
    if node.target is aten.index_copy_.default:
        return node.args[3]
    if node.target is aten.index_put_.default:
        return node.args[2]
    return None


def local_write_placement(node: fx.Node, placement: Placement) -> Placement | None:
    """The placement a buffer written by `node` with values laid out `placement` takes, if the
    write runs exactly on local shards; None if it does not."""
    buffer, value = node.args[0], written_value(node)
    if node.target not in LOCAL_WRITES or not isinstance(buffer, fx.Node) or buffer.op != "placeholder":
        return None
    if placement.is_replicate():
        return placement
    if not placement.is_shard() or not isinstance(value, fx.Node):
        return None
    bval, vval = buffer.meta.get("val"), value.meta.get("val")
    if not isinstance(bval, torch.Tensor) or not isinstance(vval, torch.Tensor) or bval.ndim != vval.ndim:
        return None
    d = placement.dim % bval.ndim
    if bval.shape[d] != vval.shape[d]:
        return None
    if node.target is aten.index_copy_.default and node.args[1] % bval.ndim == d:
        return None
    if node.target is aten.index_put_.default:
        indices = list(node.args[1])
        if d < len(indices) and indices[d] is not None:
            return None
    return placement


def reads_before_write(node: fx.Node, buffer: fx.Node) -> bool:
    """Does anything read `buffer` before `node` writes it (it would see the buffer whole)?"""
    for user in buffer.users:
        if user is node:
            continue
        cur = user
        while cur is not None and cur is not node:
            cur = cur.next
        if cur is node:
            return True
    return False


def state_write_spec(simulator, node: fx.Node, buffer: fx.Node, sim, operands: dict):
    """The simulator's rule for `node` writing `buffer` in place: the buffer (and the write's
    result) take the placement of the value written, when the write runs exactly on local
    shards; a buffer whose module declares its layout (`Captured.state_layouts`) takes that one
    for replicated values (each rank writes its slice: a local slice). None: it stays whole."""
    from torch.distributed.tensor._dtensor_spec import DTensorSpec

    value = written_value(node)
    vspec = operands.get(value.name) if isinstance(value, fx.Node) else None
    if not isinstance(vspec, DTensorSpec) or reads_before_write(node, buffer):
        return None
    placement = vspec.placements[0]
    captured = simulator.analysis.captured
    declared = captured.state_layouts.get(captured.buffer_fqns[buffer.name])
    if declared is not None and placement.is_replicate():
        placement = declared
        simulator._move(sim, vspec, (declared,), value.name, node.name, planned=False)
    placement = local_write_placement(node, placement)
    if placement is None:
        return None
    spec = simulator._spec(buffer.meta["val"], placement)
    have = sim.specs.get(buffer.name)
    if isinstance(have, DTensorSpec) and have.placements != spec.placements:
        return None
    sim.specs[buffer.name] = spec
    return spec
