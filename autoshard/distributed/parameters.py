"""Parameters become DTensors under their original names; replicated ones get summed gradients.

A replicated parameter used on shards (norm weights on the sequence-parallel stream, Qwen3's
per-head q/k norms) accumulates a `Partial` gradient: each rank holds its tokens' (or heads')
share. `GradReducer` sums those shares in backward, several parameters per all-reduce, so that
optimizers, `clip_grad_norm_` and checkpoints see a plain replicated gradient laid out like its
parameter. (Left `Partial`, DTensor reduces a gradient each time something reads it: PyTorch's
hand-written plans pay one all-reduce per norm weight per optimizer access.)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

from autoshard.execute.materialize import recompute_buffers
from autoshard.distributed.strided_checkpoint import describe_blocks_hook
from autoshard.graph.capture import Captured
from autoshard.execute.rewrite import written_buffers
from autoshard.schema.fused_parts import shard_tensor
from autoshard.schema.plan import Plan, planned_placement
from autoshard.schema.units import pack_buckets

BUCKET_CAP_MB = 25.0  # DDP's default bucket size


def distribute_parameters(
    model: nn.Module, sharded: nn.Module, plan: Plan, captured: Captured, mesh: DeviceMesh, *, bucket_cap_mb: float = BUCKET_CAP_MB,
    state: dict | None = None,
) -> "GradReducer":
    """Copy `model`'s parameters (as DTensors, rank 0's values) and buffers into `sharded`.

    `distribute_tensor` scatters from rank 0 as `parallelize_module` does, so every rank starts
    from the same weights even if their random inits differ. Tied parameters stay one Parameter.
    Replicated parameters get their `Partial` gradients summed in backward by the returned
    reducer (also kept as `sharded.grad_reducer`), in buckets of up to `bucket_cap_mb`.
    `state`: FQN -> placement of the buffers forward writes that the plan lays out (a KV cache
    split by heads, `rewrite.state_placements`): DTensors of that placement.
    """
    placements = plan.placements()
    made: dict[int, nn.Parameter] = {}
    for fqn, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in made:
            placement = planned_placement(placements, captured.tied, fqn)
            # a Replicate() DTensor broadcasts into, and then shares storage with, its source:
            # copy it, so training the sharded module never writes into the user's model
            source = p.detach().clone() if placement.is_replicate() else p.detach()
            dt = shard_tensor(source, mesh, [placement])
            made[id(p)] = nn.Parameter(dt, requires_grad=p.requires_grad)
        sharded.adopt(fqn, made[id(p)])
    persistent = {s.target: s.persistent for s in captured.program.graph_signature.input_specs if s.kind.name == "BUFFER"}
    written = written_buffers(captured)
    computed = recompute_buffers(model)   # a meta model's rotary inv_freq: in no checkpoint
    for fqn, b in model.named_buffers(remove_duplicate=False):
        # a buffer forward writes (a KV cache) is the sharded module's own: the user's model is never written
        value = computed.get(fqn, b)
        value = value.detach().clone() if fqn in written else value
        if state and fqn in state:
            value = distribute_tensor(value, mesh, [state[fqn]])
        keep = persistent.get(fqn, fqn in model.state_dict())
        sharded.adopt(fqn, value, buffer=True, persistent=keep)
        if value.is_meta and not keep:
            sharded.unset_buffers.add(fqn)

    sharded.register_state_dict_post_hook(describe_blocks_hook)  # DCP reads/writes strided shards block by block
    params = dict(sharded.named_parameters())
    replicated = [f for f in backward_order(captured, params) if _is_replicated(params[f])]
    reducer = GradReducer(size_buckets(replicated, params, bucket_cap_mb))
    for fqn, p in params.items():
        if p.requires_grad:
            reducer.watch(fqn, p)
    sharded.grad_reducer = reducer
    return reducer


def _whole_grad_of_shard(p, g) -> bool:
    """DTensor computes a vocab-parallel table's gradient whole (embedding_dense_backward on the
    replicated ids): a Replicate gradient of a sharded parameter."""
    return (isinstance(p, DTensor) and isinstance(g, DTensor) and tuple(g.placements) != tuple(p.placements)
            and all(pl.is_replicate() for pl in g.placements))


def _compact(p: DTensor, g: DTensor) -> DTensor:
    """The rank's rows of a whole gradient, copied: no communication, and the whole table (1/tp of
    it is all this rank needs) is freed instead of living on as a view's storage."""
    local = g.redistribute(g.device_mesh, p.placements).to_local().clone()
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def backward_order(captured: Captured, params: dict[str, nn.Parameter]) -> list[str]:
    """Parameter FQNs in the order backward completes their gradients: by first use in forward,
    latest first (backward reaches a parameter's earliest use last)."""
    nodes = list(captured.program.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    first = {}
    for n in nodes:
        fqn = captured.param_fqns.get(n.name)
        if fqn is not None and n.users:
            first[fqn] = min(index[u] for u in n.users)
    return sorted(params, key=lambda f: -first.get(f, -1))


def size_buckets(fqns: Sequence[str], params: dict[str, nn.Parameter], cap_mb: float) -> list[list[str]]:
    """Consecutive FQNs packed into buckets of at most `cap_mb` (a larger parameter gets its own)."""
    return pack_buckets(((f, params[f].numel() * params[f].element_size()) for f in fqns), cap_mb * 2**20)


def _is_replicated(p: torch.Tensor) -> bool:
    return isinstance(p, DTensor) and all(pl.is_replicate() for pl in p.placements)


class GradReducer:
    """Sums `Partial` gradients in backward: one all-reduce per bucket of parameters.

    `watch(fqn, param)` registers a post-accumulate-grad hook. A bucket is reduced as soon as all
    its parameters have their gradient for this backward (in reverse forward order, so early
    buckets overlap with the rest of backward); whatever is still pending when backward ends
    (a parameter that got no gradient) is reduced then. Gradients that are not `Partial` are
    left alone; a watched parameter outside every bucket is settled on its own.

    >>> reducer = GradReducer([["model.norm.weight", "model.layers.1.input_layernorm.weight"]])
    >>> reducer.watch("model.norm.weight", param)   # for each parameter; idempotent
    """

    def __init__(self, buckets: Iterable[Sequence[str]]):
        self.buckets = [list(b) for b in buckets if b]
        self._bucket_of = {f: i for i, b in enumerate(self.buckets) for f in b}
        self._watched: dict[int, tuple[str, object]] = {}
        self._ready: dict[int, dict[str, nn.Parameter]] = {}
        self._flush_task = None  # the backward whose end will reduce what is still pending
        self.reductions = 0  # all-reduces issued, for tests and reports

    def watch(self, fqn: str, param: nn.Parameter) -> None:
        if id(param) in self._watched or not param.requires_grad:
            return
        handle = param.register_post_accumulate_grad_hook(lambda p, f=fqn: self._on_grad(f, p))
        self._watched[id(param)] = (fqn, handle)

    def _on_grad(self, fqn: str, param: nn.Parameter) -> None:
        bucket = self._bucket_of.get(fqn)
        if bucket is None:
            self._reduce([param])
            return
        task = torch._C._current_graph_task_id()
        if self._flush_task != task:  # first gradient of this backward
            self._flush_task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._flush)
        ready = self._ready.setdefault(bucket, {})
        ready[fqn] = param
        if len(ready) == len(self.buckets[bucket]):
            self._reduce(list(self._ready.pop(bucket).values()))

    def remove(self) -> None:
        """Unhook every watched parameter (they were replaced, e.g. by FSDP's own)."""
        for _, handle in self._watched.values():
            handle.remove()
        self._watched.clear()

    def _flush(self) -> None:
        for bucket in sorted(self._ready):
            self._reduce(list(self._ready.pop(bucket).values()))

    def _reduce(self, params: list[nn.Parameter]) -> None:
        """One all-reduce per (mesh, Partial dims, dtype) group — in practice one per bucket."""
        groups: dict[tuple, list[nn.Parameter]] = {}
        for p in params:
            g = p.grad
            if not (isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements)):
                if _whole_grad_of_shard(p, g):
                    p.grad = _compact(p, g)
                continue
            done = tuple(Replicate() if pl.is_partial() else pl for pl in g.placements)
            if not isinstance(p, DTensor) or tuple(p.placements) != done:
                p.grad = g.redistribute(g.device_mesh, p.placements if isinstance(p, DTensor) else done)
                self.reductions += 1  # a gradient that also needs resharding: on its own
                continue
            groups.setdefault((g.device_mesh, tuple(g.placements), g.dtype), []).append(p)
        for (mesh, placements, _), members in groups.items():
            grads = [p.grad for p in members]
            flat = torch.cat([g._local_tensor.reshape(-1) for g in grads])
            for dim, pl in enumerate(placements):
                if pl.is_partial():
                    flat = funcol.all_reduce(flat, pl.reduce_op, (mesh, dim))
                    self.reductions += 1
            if isinstance(flat, funcol.AsyncCollectiveTensor):
                flat = flat.wait()
            for p, g, chunk in zip(members, grads, flat.split([g._local_tensor.numel() for g in grads])):
                local = chunk.view_as(g._local_tensor)
                p.grad = DTensor.from_local(local, mesh, p.placements, run_check=False, shape=g.shape, stride=g.stride())
