"""Placement simulation: DTensor's own sharding propagator run over the exported graph.

No tensors are computed and no collective runs: each node's operands get `DTensorSpec`s (concrete
shapes from export's symbolic hints) and DTensor's `ShardingPropagator` says which output
placement the op produces and which operands it would have to redistribute first. A redistribution
that moves data (Shard->Replicate, Partial->anything, Shard(i)->Shard(j)) is communication; the
label pass calls a region legal when none happens inside it, and the report/cost model read the
planned ones at region boundaries.

Some ops are decided here rather than by the propagator, each for a stated reason (and in-place
writes of module state, a KV cache, by `graph/state_writes.state_write_spec`):
- `aten.linear` is CompositeImplicit (DTensor sees `t`, `view`, `mm`, `add`): that decomposition.
- attention runs as a `local_map` region (CPU SDPA has no DTensor strategy): q/k/v split alike.
- `cross_entropy_loss` on vocab-sharded logits runs as autoshard's vocab-parallel loss.
- grouped (expert) matmuls run on local shards (`LocalGroupedMM`): DTensor has no rule for them;
  an expert-parallel block runs whole on each rank's tokens (`graph/experts.expert_block_spec`).
- a linear with a fused weight (`_StridedShard(0, sf=k)`: q|k|v or gate|up split part by part)
  runs on local shards (runtime: `LocalLinear`): DTensor's decomposition of it loses the layout.
- `chunk`/equal `split` of a fused output (`_StridedShard(d, sf=k)` cut in k on d) gives k
  `Shard(d)` parts (runtime: `LocalChunk`): each rank's slice holds its share of every part, in order;
  so does `x[..., s::k]` of a value split in blocks of whole k-tuples (interleaved parts, `LocalStridedSlice`).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor._op_schema import OpSchema, RuntimeSchemaInfo
from torch.distributed.tensor.placement_types import Placement, _StridedShard

from autoshard.graph.analyse import ATTENTION_OPS, GraphAnalysis, Role, is_grouped_mm
from autoshard.graph.experts import expert_block_spec, plan_expert_blocks
from autoshard.graph.grouped import (attention_operand, fused_chunk, fused_linear_spec, grouped_mm_spec, interleaved_part,
                                     only_local_rules_read_parts)
from autoshard.graph.state_writes import state_write_spec, written_placeholder
from autoshard.schema.plan import Plan, placement_str

aten = torch.ops.aten
REPLICATE = Replicate()


@dataclass(frozen=True)
class Redistribution:
    """One layout change of one value: `source`'s output as seen by `consumer`."""

    source: str
    consumer: str
    src: str
    dst: str
    collective: str | None     # None: a local op (Replicate -> Shard / Partial)
    nbytes: int                # logical (global) tensor bytes, NCCL's convention for S
    planned: bool              # an explicit boundary of the plan, not one DTensor adds on its own


@dataclass
class Simulation:
    specs: dict[str, Any] = field(default_factory=dict)          # node -> DTensorSpec | tuple | None
    redistributions: list[Redistribution] = field(default_factory=list)
    mixed: set[str] = field(default_factory=set)                  # plain tensors meet DTensors here
    unsupported: dict[str, str] = field(default_factory=dict)     # node -> why it fell back
    op_collectives: list[Redistribution] = field(default_factory=list)  # inside ops (loss parallel, expert all-to-alls)
    expert_nodes: dict = field(default_factory=dict)   # node -> the expert-parallel block it runs in

    def communication(self, planned: bool | None = None) -> list[Redistribution]:
        return [r for r in self.redistributions if r.collective and (planned is None or r.planned == planned)]

    def placement(self, name: str) -> tuple[Placement, ...] | None:
        spec = self.specs.get(name)
        return spec.placements if isinstance(spec, DTensorSpec) else None


def collective_for(src: Placement, dst: Placement) -> str | None:
    if src == dst or src.is_replicate():
        return None
    if src.is_partial():
        return "reduce_scatter" if dst.is_shard() else "all_reduce"
    if dst.is_shard():
        return "all_to_all"
    return "all_gather"


def hint(x: Any) -> Any:
    if isinstance(x, torch.SymInt):
        node = x.node
        if node.hint is not None:
            return int(node.hint)
        # a data-dependent size (tokens routed to one expert): priced at torch's optimization hint
        return int(node.shape_env.optimization_hint(node.expr, fallback=1))
    if isinstance(x, (list, tuple)):
        return type(x)(hint(v) for v in x)
    return x


def tensor_meta(val: torch.Tensor) -> TensorMeta:
    return TensorMeta(torch.Size(hint(tuple(val.shape))), hint(tuple(val.stride())), val.dtype)


def nbytes(meta: TensorMeta) -> int:
    return math.prod(meta.shape) * meta.dtype.itemsize


class PlacementSimulator:
    """Propagates placements over `analysis.graph` on a 1-D mesh (the tensor-parallel dim)."""

    def __init__(self, analysis: GraphAnalysis, mesh: DeviceMesh):
        if mesh.ndim != 1:
            raise ValueError("the simulator works on the 1-D tensor-parallel sub-mesh")
        self.analysis = analysis
        self.mesh = mesh
        self.prop = DTensor._op_dispatcher.sharding_propagator

    # ---- public -------------------------------------------------------------------------------
    def run(
        self,
        param_placements: dict[str, Placement],
        boundaries: dict[str, Placement] | None = None,
        nodes: set[str] | None = None,
        assumed: dict[str, Placement] | None = None,
        sharded_outputs: set[str] = frozenset(),
        expert_parallel=(),
    ) -> Simulation:
        """Simulate the whole graph, or only `nodes` (operands from outside take `assumed`/Replicate).

        `param_placements`: FQN -> placement (default Replicate). `boundaries`: node -> the layout
        every consumer of that node sees (an explicit redistribute after it). `sharded_outputs`:
        graph outputs returned as DTensors instead of being gathered.
        """
        sim = Simulation()
        sim.expert_nodes = {n: b for b in expert_parallel for n in b.nodes}   # blocks run on each rank's tokens
        for node in self.analysis.graph.nodes:
            if nodes is None or node.name in nodes:
                self.step(sim, node, param_placements, boundaries, nodes, assumed, sharded_outputs)
        return sim

    def step(self, sim, node, param_placements, boundaries=None, nodes=None, assumed=None, sharded_outputs=frozenset()):
        """Simulate one node into `sim` (its operands must already be there, or be outside `nodes`)."""
        if node.name in sim.expert_nodes:
            spec = expert_block_spec(self, sim, node, sim.expert_nodes[node.name])
        else:
            spec = self._node_spec(node, sim, param_placements, nodes, assumed or {}, sharded_outputs)
        if boundaries and node.name in boundaries and isinstance(spec, DTensorSpec):
            target = (boundaries[node.name],)
            if spec.placements == target:
                # an explicit boundary that keeps the layout still matters: its backward reduces
                # the gradient there (Megatron's `f`), so the plan and rewrite must carry it
                sim.redistributions.append(Redistribution(node.name, node.name, _fmt(target), _fmt(target), None, nbytes(spec.tensor_meta), planned=True))
            spec = self._move(sim, spec, target, node.name, node.name, planned=True)
        sim.specs[node.name] = spec
        return spec

    # ---- per node -----------------------------------------------------------------------------
    def _node_spec(self, node, sim, params, nodes, assumed, sharded_outputs):
        role = self.analysis.roles[node.name]
        if node.op == "placeholder":
            fqn = self.analysis.param_of(node)
            if fqn is None:
                return None  # user inputs, buffers, constants run as plain tensors
            return self._spec(node.meta["val"], params.get(fqn, REPLICATE))
        if node.op == "output":
            self._gather_outputs(node, sim, sharded_outputs)
            return None
        if node.op != "call_function" or role is Role.ASSERT or node.target is aten.sym_size.int:
            return None  # (a size read moves no data: a DTensor's size is its global one)
        if node.target is operator.getitem:
            src = self._operand(node.args[0], sim, nodes, assumed, params)
            return src[node.args[1]] if isinstance(src, (tuple, list)) else None

        operands = {n.name: self._operand(n, sim, nodes, assumed, params) for n in node.all_input_nodes}
        tensor_ops = {k: v for k, v in operands.items() if isinstance(v, DTensorSpec)}
        if not tensor_ops:
            return None  # a plain-tensor computation (masks, rotary tables, position ids)
        written = written_placeholder(node)
        if written is not None and written.name in self.analysis.captured.buffer_fqns:
            spec = state_write_spec(self, node, written, sim, operands)   # a KV cache takes its keys' placement
            if spec is not None:
                return spec
        if isinstance(node.target, torch._ops.HigherOrderOperator):
            sim.unsupported[node.name] = "DTensor operands enter a higher-order op; run replicated"
            for k, v in tensor_ops.items():
                self._move(sim, v, (REPLICATE,), k, node.name, planned=False)
            return None
        plain = [n.name for n in node.all_input_nodes if self._is_plain_tensor(n, operands)]
        if plain:
            sim.mixed.add(node.name)
        if node.target is aten.linear.default:
            return self._linear(node, sim, operands)
        if is_grouped_mm(node.target):
            return grouped_mm_spec(self, node, sim, operands)
        if fused_chunk(node, operands.get(node.args[0].name) if isinstance(node.args[0], fx.Node) else None):
            dim = operands[node.args[0].name].placements[0].dim
            return tuple(self._spec(v, Shard(dim)) for v in node.meta["val"])
        d = interleaved_part(node, operands.get(node.args[0].name), self.mesh.size()) if isinstance(node.args[0], fx.Node) else None
        if d is not None:
            return self._spec(node.meta["val"], Shard(d))
        if node.target in ATTENTION_OPS:
            return self._attention(node, sim, operands)
        if node.target is aten.matmul.default and self._batch_sharded_matmul(node, operands):
            return self._matmul(node, sim, operands)
        if node.target is aten.cross_entropy_loss.default:
            return self._cross_entropy(node, sim, operands)
        return self._propagate(node, sim, operands)

    def _operand(self, n: fx.Node, sim: Simulation, nodes, assumed, params):
        if nodes is None or n.name in nodes or n.name in sim.specs:
            return sim.specs.get(n.name)
        val = n.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return None
        fqn = self.analysis.param_of(n)
        if fqn is not None:
            return self._spec(val, params.get(fqn, REPLICATE))
        if self.analysis.roles[n.name] in (Role.INPUT, Role.BUFFER):
            return None  # plain at runtime wherever it is used
        return self._spec(val, assumed.get(n.name, REPLICATE))

    def _is_plain_tensor(self, n: fx.Node, operands) -> bool:
        return operands.get(n.name) is None and isinstance(n.meta.get("val"), torch.Tensor)

    def _spec(self, val: torch.Tensor, placement: Placement | tuple) -> DTensorSpec:
        placements = placement if isinstance(placement, tuple) else (placement,)
        return DTensorSpec(self.mesh, placements, tensor_meta(val))

    def _schema(self, op, args, kwargs) -> OpSchema:
        # The propagator caches by schema; without the op's RuntimeSchemaInfo the cache key ignores
        # non-tensor args (a view's target shape!), so look it up as DTensor's dispatcher does, and
        # hash every argument for ops that register none.
        info = self.prop.op_to_schema_info.get(op) or self.prop.op_to_schema_info_for_single_dim_strategy.get(op)
        if info is None:
            info = RuntimeSchemaInfo(static_argnum=0, static_kwargkey=list(kwargs), needs_pytree=True)
        return OpSchema(op, args, kwargs, schema_info=info)

    def _args(self, node: fx.Node, operands) -> tuple[tuple, dict]:
        def conv(a):
            if isinstance(a, fx.Node):
                spec = operands.get(a.name)
                if spec is not None:
                    return spec
                val = a.meta.get("val")
                if isinstance(val, torch.Tensor):  # a plain tensor meeting DTensors: replicated
                    return self._spec(val, REPLICATE)
                return hint(val)
            if isinstance(a, (list, tuple)):
                return type(a)(conv(x) for x in a)
            return a

        return conv(node.args), {k: conv(v) for k, v in node.kwargs.items()}

    def _propagate(self, node, sim, operands):
        args, kwargs = self._args(node, operands)
        try:
            only_local_rules_read_parts(operands)
            out = self.prop.propagate_op_sharding(self._schema(node.target, args, kwargs))
        except Exception as e:  # noqa: BLE001 - an op DTensor cannot shard: it would run replicated
            sim.unsupported[node.name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            for k, v in operands.items():
                if isinstance(v, DTensorSpec):
                    self._move(sim, v, (REPLICATE,), k, node.name, planned=False)
            return self._spec(node.meta["val"], REPLICATE) if isinstance(node.meta.get("val"), torch.Tensor) else None
        if out.redistribute_schema is not None:
            self._record_input_moves(node, sim, args, out.redistribute_schema.args_schema)
        return out.output_spec

    def _record_input_moves(self, node, sim, have, want, sources=None):
        names = sources or flatten_names(node.args)
        for i, (h, w) in enumerate(zip(_flatten(have), _flatten(want))):
            if isinstance(h, DTensorSpec) and isinstance(w, DTensorSpec) and h.placements != w.placements:
                src_name = names[i] if i < len(names) and names[i] else node.name
                self._move(sim, h, w.placements, src_name, node.name, planned=False)

    def _move(self, sim, spec: DTensorSpec, placements, source, consumer, planned) -> DTensorSpec:
        if spec.placements != tuple(placements):
            sim.redistributions.append(Redistribution(
                source=source, consumer=consumer, src=_fmt(spec.placements), dst=_fmt(placements),
                collective=collective_for(spec.placements[0], placements[0]), nbytes=nbytes(spec.tensor_meta), planned=planned))
        return DTensorSpec(spec.mesh, tuple(placements), spec.tensor_meta)

    # ---- ops decided here -----------------------------------------------------------------------
    def _step(self, sim, node, op, args, sources):
        out = self.prop.propagate_op_sharding(self._schema(op, args, {}))
        if out.redistribute_schema is not None:
            self._record_input_moves(node, sim, args, out.redistribute_schema.args_schema, sources)
        return out.output_spec

    def _linear(self, node, sim, operands):
        args, _ = self._args(node, operands)
        x, w, b = (*args[:3], None)[:3]
        names = [a.name if isinstance(a, fx.Node) else None for a in node.args]
        if isinstance(w.placements[0], _StridedShard):
            return fused_linear_spec(self, node, sim, (x, w, b), names)
        try:
            wt = self._step(sim, node, aten.t.default, (w,), [names[1]])
            k, n = w.tensor_meta.shape[1], w.tensor_meta.shape[0]
            lead = list(x.tensor_meta.shape[:-1])
            x2 = x
            if len(lead) != 1:  # DTensor folds N-d inputs to 2-d for mm, as at runtime
                x2 = self._step(sim, node, aten.view.default, (x, [-1, k]), [names[0]])
            out = self._step(sim, node, aten.mm.default, (x2, wt), [names[0], names[1]])
            if len(lead) != 1:
                out = self._step(sim, node, aten.view.default, (out, lead + [n]), [None])
            if isinstance(b, DTensorSpec):
                out = self._step(sim, node, aten.add.Tensor, (out, b), [None, names[2]])
            return out
        except Exception as e:  # noqa: BLE001
            sim.unsupported[node.name] = f"linear: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            return self._spec(node.meta["val"], REPLICATE)

    def _attention(self, node, sim, operands):
        """q, k, v sharded alike on batch (0) or heads (1), else replicated; the mask follows; a k, v
        or mask of one head (or row) broadcast over q's stays whole."""
        args, _ = self._args(node, operands)
        names = flatten_names(node.args)
        q = args[0]
        target = q.placements[0]
        if not (target.is_shard() and target.dim in (0, 1)):
            target = REPLICATE
        for i, spec in enumerate(args[:4]):
            if not isinstance(spec, DTensorSpec):
                continue
            want = attention_operand(target, spec.tensor_meta.shape) if i else target
            if spec.placements != (want,):
                self._move(sim, spec, (want,), names[i] or node.name, node.name, planned=False)
        return self._spec(node.meta["val"], target)

    def _batch_sharded_matmul(self, node, operands) -> bool:
        """A batched matmul (both operands >= 3-D, same rank) with a batch dim sharded."""
        a, b = (operands.get(x.name) if isinstance(x, fx.Node) else None for x in node.args[:2])
        if not (isinstance(a, DTensorSpec) and isinstance(b, DTensorSpec)):
            return False
        nd = len(a.tensor_meta.shape)
        if nd < 3 or len(b.tensor_meta.shape) != nd:
            return False
        return any(p.is_shard() and p.dim % nd < nd - 2 for p in (a.placements[0], b.placements[0]))

    def _matmul(self, node, sim, operands):
        """Each batch index of a batched matmul is independent, so it runs on local batch shards
        (runtime: `LocalMatmul`); DTensor would fold the batch dims into one and gather them."""
        args, _ = self._args(node, operands)
        nd = len(args[0].tensor_meta.shape)
        target = next(p for p in (args[0].placements[0], args[1].placements[0]) if p.is_shard() and p.dim % nd < nd - 2)
        target = Shard(target.dim % nd)
        names = flatten_names(node.args)
        for i, spec in enumerate(args[:2]):
            if spec.placements != (target,):
                self._move(sim, spec, (target,), names[i] or node.name, node.name, planned=False)
        return self._spec(node.meta["val"], target)

    def _cross_entropy(self, node, sim, operands):
        args, _ = self._args(node, operands)
        logits = args[0]
        p = logits.placements[0]
        last = len(logits.tensor_meta.shape) - 1
        names = flatten_names(node.args)
        if p.is_shard() and p.dim in (last, -1):
            # vocab-parallel loss (autoshard.ops.loss_parallel): all-reduce of the row maxima, then
            # one of the stacked row sums (sum-exp, target logit, + row sum with label smoothing)
            rows = nbytes(logits.tensor_meta) // (logits.tensor_meta.shape[-1] * logits.tensor_meta.dtype.itemsize)
            smoothing = node.args[5] if len(node.args) > 5 else node.kwargs.get("label_smoothing", 0.0)
            item = 8 if logits.tensor_meta.dtype == torch.float64 else 4
            for what, k in (("row max", 1), ("row sums", 3 if smoothing else 2)):
                sim.op_collectives.append(
                    Redistribution(node.name, node.name, what, "Replicate()", "all_reduce", rows * k * item, planned=True)
                )
        elif p != REPLICATE:
            self._move(sim, logits, (REPLICATE,), names[0] or node.name, node.name, planned=False)
        return self._spec(node.meta["val"], REPLICATE)

    def _gather_outputs(self, node, sim, sharded_outputs):
        for n in node.all_input_nodes:
            spec = sim.specs.get(n.name)
            if isinstance(spec, DTensorSpec) and spec.placements != (REPLICATE,) and n.name not in sharded_outputs:
                self._move(sim, spec, (REPLICATE,), n.name, "output", planned=True)


def _flatten(x) -> list:
    return [y for v in x for y in _flatten(v)] if isinstance(x, (list, tuple)) else [x]


def flatten_names(args) -> list[str | None]:
    return [a.name if isinstance(a, fx.Node) else None for a in _flatten(args)]


def _fmt(placements) -> str:
    return ",".join(placement_str(p) for p in placements)


def simulate(simulator: PlacementSimulator, plan: Plan) -> Simulation:
    """`plan`'s placements propagated over the graph: what the rewrite and the lowering follow."""
    return simulator.run(plan.placements(), plan.boundary_placements(), sharded_outputs=set(plan.sharded_outputs),
                         expert_parallel=plan_expert_blocks(simulator.analysis, plan))

