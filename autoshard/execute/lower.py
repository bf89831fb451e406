"""Pass 7 (optional) — lower: the DTensor program becomes a graph of plain local tensors.

The rewritten graph runs on DTensors: every op pays DTensor's dispatch, and in torch 2.13 a
DTensor training graph does not compile with dynamic shapes (`as_strided` is unsupported with DTensor). The plan's simulation
already knows every node's placement, so each node can run on its local shard directly:

- each `Redistribute` becomes an explicit collective from `execute/local_ops.py` whose
  backward is the Megatron pairing, chosen by a gradient-placement analysis of the graph
  (a replicated value read by sharded ops gets partial-sum gradients: all-gather <-> reduce-scatter,
  identity <-> all-reduce; a graph output gets a replicated gradient: all-gather <-> slice);
- ops whose arguments spell a size (view, reshape, expand) get the sharded dim as `-1` (its local
  size), `sym_size` of a sharded dim becomes the global size, computed from the inputs;
- the vocab-parallel embedding, attention, batched matmuls and the loss run as local functions;
  ops DTensor has no rule for (`ReplicatedLocal`) run as the plain op on replicated values;
- placeholders stay in export order: the caller passes `param.to_local()` (with the gradient
  placement this pass found: `Partial` for replicated parameters used on shards, so their
  gradient is summed once after backward) and the user inputs unchanged.

Sequence-sharded activations are padded to `ceil(seq / tp)` rows on every rank (see
`local_ops`), so every rank runs one graph and a compiled graph needs no guard on the length.
Anything the lowering cannot express exactly (an implicit collective DTensor would insert, a
size-taking op on a sharded dim, inconsistent gradient placements) raises `LoweringError`; the
caller then keeps the DTensor program.
"""

from __future__ import annotations

import copy
import operator

import torch
from torch import fx
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement, _StridedShard

from autoshard.execute import dtensor_ops as runtime
from autoshard.execute import local_ops as rt
from autoshard.execute.grad_placement import GradientPlacements, boundary_gradient, carries_gradient
from autoshard.execute.local_placement import PARTIAL_AVG, forward_placements, global_value, local_placement
from autoshard.execute.lowered_program import LoweredProgram, describe_collectives, dynamic_dims, param_grad_placements, sharded_outputs
from autoshard.execute.sym_sizes import SizeEmitter
from autoshard.schema.errors import PlanError
from autoshard.graph.capture import Captured
from autoshard.graph.grouped import attention_operand
from autoshard.schema.placements import splits
from autoshard.schema.plan import Plan, parse_placement
from autoshard.schema.units import chunk_start
from autoshard.graph.analyse import embedding_args
from autoshard.graph.simulate import Simulation

aten = torch.ops.aten
REPLICATE, PARTIAL = Replicate(), Partial()
SHAPE_ARG_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.view_copy.default}
EXPAND_OPS = {aten.expand.default, aten.expand_copy.default}
SIZE_FACTORIES = {aten.new_empty.default, aten.new_full.default, aten.new_ones.default, aten.new_zeros.default,
                  aten.new_empty_strided.default}


class LoweringError(PlanError):
    """The DTensor program has something the local lowering cannot express exactly."""


def lower_graph(gm: fx.GraphModule, captured: Captured, plan: Plan, sim: Simulation, mesh: DeviceMesh) -> LoweredProgram:
    """Lower the rewritten DTensor graph `gm` (see `rewrite.rewrite_graph`) to local tensors."""
    return _Lowering(gm, captured, plan, sim, mesh).run()


class _Lowering:
    def __init__(self, gm, captured, plan, sim, mesh):
        self.gm = copy.deepcopy(gm)
        self.graph: fx.Graph = self.gm.graph
        self.captured, self.plan, self.sim, self.mesh = captured, plan, sim, mesh
        self.tp = mesh.size()
        self.rank = mesh.get_local_rank()
        self.group = mesh.get_group().group_name
        self.placement: dict[fx.Node, object] = {}       # forward placement of each node's (local) value
        self.carries_grad: dict[fx.Node, bool] = {}         # does the value carry a gradient
        self.grad_placement: dict[fx.Node, Placement | None] = {}  # placement of its gradient

    def run(self) -> LoweredProgram:
        # sizes computed from inputs go after the last input (the rewrite may have put a node that
        # wraps an early input, e.g. a buffer, between placeholders)
        if self.plan.expert_parallel:  # its local step and gradients are not in the lowering's analysis yet
            raise LoweringError(f"expert-parallel MoE blocks ({', '.join(self.plan.expert_parallel)}) run on the DTensor program")
        self._drop_consistent_grads()
        nodes = list(self.graph.nodes)
        last_input = max(i for i, n in enumerate(nodes) if n.op == "placeholder")
        self.sizes = SizeEmitter(self.graph, nodes[last_input + 1], LoweringError)
        self._reject_implicit_collectives()
        self._placements()
        self._insert_conversions()
        self.carries_grad = carries_gradient(self.graph, self._val, self.captured)
        grads = GradientPlacements(self.graph, self.placement, self.carries_grad, set(self.plan.sharded_outputs),
                                   lambda n: self.gm.get_submodule(n.target), LoweringError)
        self.grad_placement = grads.run()
        self._scale_whole_gradients(grads.mixed)
        self._rewrite()
        outputs, sizes = sharded_outputs(self.graph, self.placement, self._val, set(self.plan.sharded_outputs), LoweringError)
        self.graph.eliminate_dead_code()
        self.gm.delete_all_unused_submodules()
        self.graph.lint()
        self.gm.recompile()
        return LoweredProgram(self.gm, param_grad_placements(self.graph, self.captured, self.placement, self.grad_placement), outputs, sizes,
                              dynamic_dims(self.graph, self.captured), describe_collectives(self.graph))

    def _scale_whole_gradients(self, mixed: dict):
        """A whole gradient joining partial ones (`GradientPlacements.mixed`) comes back divided by tp
        (after the `getitem` that takes it from a multi-output op: a split of a replicated value)."""
        for node, users in mixed.items():
            for user in users:
                after = user.target is operator.getitem
                with (self.graph.inserting_after(user) if after else self.graph.inserting_before(user)):
                    new = self.graph.call_function(rt.scale_grad, (user if after else node, self.tp))
                self.placement[new], self.carries_grad[new], self.grad_placement[new] = REPLICATE, True, REPLICATE
                if after:
                    user.replace_all_uses_with(new, delete_user_cb=lambda n: n is not new)
                    self.grad_placement[user] = PARTIAL
                else:
                    user.replace_input_with(node, new)

    def _drop_consistent_grads(self):
        """Local tensors carry their own strides: the DTensor program's gradient-layout guards go."""
        for node in list(self.graph.nodes):
            if node.op == "call_module" and isinstance(self.gm.get_submodule(node.target), runtime.ConsistentGrad):
                node.replace_all_uses_with(node.args[0])
                self.graph.erase_node(node)

    # ---- placements -------------------------------------------------------------------------------
    def _reject_implicit_collectives(self):
        for r in self.sim.communication(planned=False):
            raise LoweringError(f"DTensor would add {r.collective} at {r.consumer} ({r.src} -> {r.dst}): not planned, not lowered")

    def _placements(self):
        self.placement = forward_placements(self.graph, self.sim, lambda n: self.gm.get_submodule(n.target), LoweringError)

    def _val(self, node: fx.Node):
        return global_value(node)

    # ---- conversions DTensor would do locally (slicing a replicated value) -----------------------
    def _made_explicit(self, node: fx.Node, move) -> bool:
        """Did the rewrite turn this implicit slice into a `Redistribute` to the same placement?"""
        for a in node.all_input_nodes:
            mod = self.gm.get_submodule(a.target) if a.op == "call_module" else None
            if (isinstance(mod, runtime.Redistribute) and getattr(a.args[0], "name", None) == move.source
                    and mod.placements == (parse_placement(move.dst),)):
                return True
        return False

    def _wraps(self, node: fx.Node, move) -> bool:
        """Is `node` the rewrite's `ToReplicate` or `Redistribute` of the value `move` slices, to
        the placement the slice starts from (a table the graph computes, BLOOM's ALiBi slopes; an
        embedding sum replicated before the sequence-sharded stream): DTensor slices the wrapper's
        output, so the lowering does."""
        return (node.op == "call_module" and isinstance(self.gm.get_submodule(node.target), (runtime.ToReplicate, runtime.Redistribute))
                and getattr(node.args[0], "name", None) == move.source and self.placement.get(node) == parse_placement(move.src))

    def _insert_conversions(self):
        moves: dict[str, list] = {}
        for r in self.sim.redistributions:
            if not r.planned:
                moves.setdefault(r.consumer, []).append(r)
        for node in list(self.graph.nodes):
            if node.op == "call_module":
                self._module_inputs(node)
            elif node.op == "call_function" and node.name in moves:
                if node.target is aten.embedding.default and self.placement.get(node.args[0]) == Shard(0):
                    continue  # the ids' MaskPartial: the vocab-parallel lookup does it
                for r in moves[node.name]:
                    src = next((a for a in node.all_input_nodes if a.name == r.source or self._wraps(a, r)), None)
                    if src is None and self._made_explicit(node, r):
                        continue  # the rewrite sliced it with a Redistribute: lowered as one
                    if src is None:
                        raise LoweringError(f"implicit redistribution of {r.source} at {node.name} not found in the graph")
                    self._convert(node, src, local_placement(parse_placement(r.dst), src))

    def _module_inputs(self, node):
        mod = self.gm.get_submodule(node.target)
        if isinstance(mod, runtime.LocalAttention) and self.placement[node] is not None:
            p = self.placement[node]
            q, k, v, mask = (list(node.args) + [None])[:4]
            self._convert(node, q, p)
            for a in (k, v, mask):
                if isinstance(a, fx.Node):
                    self._convert(node, a, attention_operand(p, self._val(a).shape))
        elif isinstance(mod, runtime.LocalMatmul) and self.placement[node] is not None:
            p = self.placement[node]
            vals = [self._val(a) for a in node.args[:2]]
            out_ndim = max(v.ndim for v in vals)
            for a, val, role in zip(node.args[:2], vals, ("a", "b")):
                want = runtime.operand_placement(p, val, out_ndim, role)
                if p.is_shard() and want == REPLICATE and val.is_floating_point() and val.requires_grad:
                    raise LoweringError(f"{node.name}: {a.name} is whole on every rank next to a split product; "
                                        "its partial gradient is not lowered")
                self._convert(node, a, want)
        elif isinstance(mod, runtime.LocalStateWrite):
            buffer = self.placement.get(node.args[0])
            for a in node.all_input_nodes[1:]:
                val = self._val(a)
                if buffer is not None and isinstance(val, torch.Tensor) and val.ndim == self._val(node.args[0]).ndim:
                    self._convert(node, a, buffer)   # a replicated value into a split buffer: the local slice
        elif isinstance(mod, runtime.ReplicatedLocal):
            for a in node.all_input_nodes:
                if self.placement.get(a) not in (None, REPLICATE):  # DTensor would gather it inside the module
                    raise LoweringError(f"{node.name} runs {mod.target} whole on every rank but its input {a.name} "
                                        f"is {self.placement.get(a)}: the gather inside it is not lowered")

    def _convert(self, user: fx.Node, src: fx.Node, want: Placement):
        have = self.placement.get(src)
        if have is None:
            have = REPLICATE  # a plain tensor is the same on every rank
        if have == want:
            return
        if have == REPLICATE and want.is_shard():
            fn, args = rt.shard_local, (src, want.dim, self.tp, self.rank, self._padded(src, want.dim))
        elif have == REPLICATE and want.is_partial():
            fn, args = rt.partition_value, (src, self.tp)
        else:
            raise LoweringError(f"{src.name} ({have}) would need communication to become {want} for {user.name}")
        with self.graph.inserting_before(user):
            new = self.graph.call_function(fn, args)
        self.placement[new] = want
        user.replace_input_with(src, new)

    def _padded(self, node: fx.Node, dim: int) -> bool:
        val = self._val(node)
        return isinstance(val, torch.Tensor) and isinstance(val.shape[dim], torch.SymInt)

    def _boundary_forward(self, node, src, dst, gk):
        """(forward function, args) of a planned boundary; (None, None): nothing to do locally."""
        x = node.args[0]
        boundary_gradient(src, dst, gk, node.name, LoweringError)  # raises where no lowering exists
        if src is None or dst is None or src == dst and not src.is_replicate():
            return None, None
        if src == REPLICATE and dst == REPLICATE:
            return (rt.reduce_grad, (x, self.group)) if gk == PARTIAL else (None, None)
        if src.is_shard() and dst == REPLICATE:  # backward: reduce-scatter a partial gradient, slice a whole one
            back = "reduce_scatter" if gk == PARTIAL or gk is None else "slice"
            return rt.all_gather, (x, src.dim, self._global_size(x, src.dim), self.tp, self.rank, self.group, self._padded(x, src.dim), back)
        if src == PARTIAL and dst.is_shard():
            return rt.reduce_scatter, (x, dst.dim, self.tp, self.rank, self.group, self._padded(x, dst.dim))
        if src in (PARTIAL, PARTIAL_AVG) and dst == REPLICATE:  # partial gradients back (rows straight into column linears): summed
            return rt.all_reduce, (x, self.group, gk == PARTIAL, self.tp if src == PARTIAL_AVG else 1)
        return rt.shard_local, (x, dst.dim, self.tp, self.rank, self._padded(x, dst.dim))  # REPLICATE -> Shard

    # ---- rewrite ----------------------------------------------------------------------------------
    def _rewrite(self):
        for node in list(self.graph.nodes):
            if node.op == "call_module":
                self._rewrite_module(node)
            elif node.op == "call_function":
                self._rewrite_function(node)

    def _replace(self, node, fn, args, kwargs=None):
        val = self._val(node)
        with self.graph.inserting_before(node):
            new = self.graph.call_function(fn, tuple(args), kwargs or {})
        new.meta = dict(node.meta)
        if val is not None:
            new.meta["val"] = val
        for d in (self.placement, self.carries_grad, self.grad_placement):
            d[new] = d.get(node)
        self._erase(node, new)
        return new

    def _drop(self, node, value):
        self._erase(node, value)

    def _erase(self, node, value):
        """Uses of `node` read `value`; sizes emitted later go where `node` was (an erased anchor
        would unlink them and what was inserted before it)."""
        if self.sizes.anchor is node:
            self.sizes.anchor = node.next
        node.replace_all_uses_with(value)
        self.graph.erase_node(node)

    def _rewrite_module(self, node):
        mod = self.gm.get_submodule(node.target)
        x = node.args[0] if node.args else None
        if isinstance(mod, runtime.Redistribute):
            fn, args = self._boundary_forward(node, self.placement.get(x), self.placement[node], self.grad_placement.get(node))
            self._drop(node, x) if fn is None else self._replace(node, fn, args)
        elif isinstance(mod, runtime.ToReplicate):
            if self.grad_placement.get(node) == PARTIAL:
                self._replace(node, rt.reduce_grad, (x, self.group))
            else:
                self._drop(node, x)
        elif isinstance(mod, runtime.ToFull):
            src = self.placement.get(x)
            if src is None or src == REPLICATE:
                self._drop(node, x)
            elif src == PARTIAL:
                self._replace(node, rt.all_reduce, (x, self.group))
            else:
                self._replace(node, rt.all_gather, (x, src.dim, self._global_size(x, src.dim), self.tp, self.rank,
                                                    self.group, self._padded(x, src.dim), "slice"))
        elif isinstance(mod, runtime.LocalAttention):
            q, k, v, mask = (list(node.args) + [None])[:4]
            self._replace(node, rt.attention, (q, k, v, mask, mod.layout), mod.sdpa_kwargs)
        elif isinstance(mod, runtime.LocalMatmul):
            self._replace(node, torch.matmul, node.args[:2])
        elif isinstance(mod, (runtime.ReplicatedLocal, runtime.LocalGroupedMM, runtime.LocalStridedSlice, runtime.LocalStateWrite)):
            self._replace(node, mod.target, node.args, dict(node.kwargs))
        elif isinstance(mod, runtime.LocalLinear):
            self._replace(node, aten.linear.default, node.args)
        elif isinstance(mod, runtime.LocalChunk):
            self._replace(node, aten.split_with_sizes.default, (node.args[0], mod.local_sizes(self.tp), mod.dim))
        elif isinstance(mod, runtime.VocabParallelLoss):
            self._rewrite_loss(node, mod)

    def _rewrite_loss(self, node, mod):
        logits, target = node.args[:2]
        p = self.placement.get(logits)
        val = self._val(logits)
        vocab = int(val.shape[-1])
        if p is None or p == REPLICATE:
            opts = dict(weight=mod.weight, reduction=mod.reduction, ignore_index=mod.ignore_index, label_smoothing=mod.label_smoothing)
            self._replace(node, aten.cross_entropy_loss.default, (logits, target), opts)
            return
        if not (p.is_shard() and p.dim == val.ndim - 1) or mod.weight is not None:
            raise LoweringError(f"loss on logits laid out as {p}: only vocab-sharded logits without class weights are lowered")
        start = chunk_start(vocab, self.tp, self.rank)
        self._replace(node, rt.vocab_parallel_loss, (logits, target, start, vocab, self.group),
                      {"reduction": mod.reduction, "ignore_index": mod.ignore_index, "label_smoothing": mod.label_smoothing})

    def _rewrite_function(self, node):
        t = node.target
        out = self.placement.get(node)
        if t is torch.ops.higher_order.wrap_with_set_grad_enabled:
            enabled, fn, *args = node.args
            self._replace(node, rt.run_with_grad_enabled, (enabled, fn, *args))
        elif t is aten.embedding.default and self.placement.get(node.args[0]) == Shard(0):
            weight, ids, padding_idx, scale_grad_by_freq, sparse = embedding_args(node)
            if sparse or scale_grad_by_freq:
                # the ids outside this rank's rows are parked on row 0: its frequency count would be wrong
                raise LoweringError(f"{node.name}: a vocab-parallel embedding with sparse=True or scale_grad_by_freq=True is not lowered")
            rows = int(self._val(weight).shape[0])
            start = chunk_start(rows, self.tp, self.rank)
            self._replace(node, rt.vocab_parallel_embedding, (weight, ids, start, padding_idx))
        elif t in (aten.sym_size.int,):
            x, d = node.args
            p = self.placement.get(x)
            if p is not None and splits(p) and d % self._val(x).ndim == p.dim:
                self._drop(node, self._global_size(x, p.dim))
        elif t in (aten.sym_numel.default, aten.sym_stride.int, aten.sym_storage_offset.default):
            if isinstance(self.placement.get(node.args[0]), Shard):
                raise LoweringError(f"{node.name}: {t} of a sharded tensor")
        elif isinstance(out, _StridedShard) and t in SHAPE_ARG_OPS | EXPAND_OPS | SIZE_FACTORIES:
            raise LoweringError(f"{node.name}: {t} of a fused value laid out {out}")
        elif isinstance(out, Shard) and t in SHAPE_ARG_OPS:
            node.args = (node.args[0], self._local_view_shape(node, list(node.args[1]), out.dim), *node.args[2:])
        elif isinstance(out, Shard) and t in EXPAND_OPS:
            shape = list(node.args[1])
            src = self.placement.get(node.args[0])
            offset = len(shape) - self._val(node.args[0]).ndim
            if src != Shard(out.dim - offset):
                raise LoweringError(f"{node.name}: expand makes a new sharded dim")
            shape[out.dim] = -1
            node.args = (node.args[0], shape, *node.args[2:])
        elif isinstance(out, Shard) and t in SIZE_FACTORIES:
            raise LoweringError(f"{node.name}: {t} of a sharded size")
        elif t is aten.expand_as.default and not splits(out or REPLICATE) and splits(self.placement.get(node.args[1]) or REPLICATE):
            # whole, to the global shape (XLM's mask broadcast over split heads): `other`'s local
            # shape would make it a shard already, which the slice to shards after it cuts again
            shape = [self.sizes.size_of(s) for s in self._val(node).shape]
            self._replace(node, aten.expand.default, (node.args[0], shape))
        elif isinstance(out, Shard) and t is aten.repeat_interleave.self_int and "output_size" in node.kwargs \
                and len(node.args) > 2 and isinstance(node.args[2], int) and node.args[2] % self._val(node).ndim == out.dim:
            # the global size of the repeated dim (Mamba-2's groups repeated to heads): the local
            # repeat makes the local size
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "output_size"}

    def _local_view_shape(self, node, shape, dim):
        """A view's target with the sharded dim `-1` (inferred from the local numel); a `-1`
        elsewhere becomes that dim's global size, which is also its local size."""
        for j, s in enumerate(shape):
            if j != dim and isinstance(s, int) and s == -1:
                shape[j] = self.sizes.size_of(node.meta["val"].shape[j])
        shape[dim] = -1
        return shape

    def _global_size(self, node: fx.Node, dim: int):
        return self.sizes.size_of(self._val(node).shape[dim])
