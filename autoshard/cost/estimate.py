"""Price one simulated plan: every collective of a training step, compute time, memory.

Communication is read off the placement simulation, forward and backward:
- forward: every redistribution that moves data (planned boundaries, anything DTensor would add,
  output gathers) and the loss-parallel op's own all-reduces;
- backward: each forward layout change runs its adjoint on the gradient, which depends on the
  gradient's placement — what DTensor's `Redistribute.backward` does:
    Shard -> Replicate   gradient Partial (sharded consumers): reduce_scatter; Replicate: nothing
    Replicate -> Replicate (a boundary that keeps the layout, Megatron's f): all_reduce if Partial
    Partial -> Replicate  nothing (Megatron's g)
    Partial/Replicate -> Shard   all_gather of the sharded gradient
    Shard(i) -> Shard(j)  all_to_all
- the `Partial` gradients of replicated parameters used on shards, summed after backward by
  `distributed/parameters.py` in buckets (one all-reduce per bucket holding any of them).
Bytes follow NCCL's convention (S = the full logical tensor); DTensor pads uneven shards to equal
chunks before all_gather / reduce_scatter, so those move `ceil(n / tp) * tp` rows.

Compute is a roofline per graph node on rank 0's shard: FLOPs (matmuls, attention) and bytes read
and written, `compute.compute_time`; backward costs twice the forward (two matmuls per matmul,
about twice the elementwise traffic).

    >>> events = comm_events(analysis, sim, grad_reduce)
    >>> sum(e.nbytes for e in events if e.phase == "backward")
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch.distributed.tensor._dtensor_spec import DTensorSpec

from autoshard.cost.comm import collective_time, link_for
from autoshard.cost.compute import compute_time, peak_flops_for  # noqa: F401 - re-exported for users
from autoshard.cost.hardware import HardwareProfile
from autoshard.cost.memory import local_fraction, tensor_bytes
from autoshard.graph.analyse import GraphAnalysis, Role, is_grouped_mm
from autoshard.schema.units import chunk_block, pack_buckets

aten = torch.ops.aten
BUCKET_CAP_BYTES = 25 * 2**20  # distributed/parameters.py's bucket size (DDP's default)


@dataclass(frozen=True)
class CommEvent:
    node: str            # the node whose value moves (or the parameter, for gradient reductions)
    phase: str           # "forward" | "backward"
    collective: str      # all_reduce | all_gather | reduce_scatter | all_to_all
    nbytes: int          # NCCL's S, padding included
    why: str = ""

    def time(self, profile: HardwareProfile, tp: int, spans_nodes: bool = False) -> float:
        return collective_time(self.collective, self.nbytes, tp, link_for(profile, spans_nodes))


# ---- communication --------------------------------------------------------------------------------
def _padded(nbytes: int, spec, placement_text: str) -> int:
    """Bytes an all_gather / reduce_scatter really moves for a tensor sharded as `placement_text`."""
    if not isinstance(spec, DTensorSpec) or not placement_text.startswith("Shard("):
        return nbytes
    shape = spec.tensor_meta.shape
    dim = int(placement_text[6:placement_text.index(")")]) % len(shape)
    n = spec.mesh.size()
    size = shape[dim]
    full = math.prod(shape) * spec.tensor_meta.dtype.itemsize
    if size == 0 or full != nbytes:
        return nbytes
    return nbytes // size * (chunk_block(size, n) * n)


def requires_grad_nodes(analysis: GraphAnalysis) -> set[str]:
    """Nodes whose value depends on a trainable parameter (their gradients flow in backward)."""
    out: set[str] = set()
    for n in analysis.graph.nodes:
        if n.op == "placeholder":
            val = n.meta.get("val")
            if analysis.roles[n.name] is Role.PARAM and getattr(val, "requires_grad", True):
                out.add(n.name)
        elif any(a.name in out for a in n.all_input_nodes):
            val = n.meta.get("val")
            if not isinstance(val, torch.Tensor) or val.is_floating_point() or isinstance(val, (tuple, list)):
                out.add(n.name)
    return out


def _partial_grad(analysis: GraphAnalysis, sim, name: str, consumers: list[str]) -> bool:
    """Does a consumer of replicated `name` run on shards? Then the gradient it sends back is Partial."""
    for c in consumers:
        user = analysis.nodes.get(c)
        if user is None:
            continue
        spec = sim.specs.get(c)
        if analysis.roles[c] is Role.VIEW and isinstance(spec, DTensorSpec) and spec.placements[0].is_replicate():
            # a view passes the gradient through unchanged: look at who uses the view
            if _partial_grad(analysis, sim, c, [u.name for u in user.users]):
                return True
            continue
        specs = [sim.specs.get(c)] + [sim.specs.get(a.name) for a in user.all_input_nodes if a.name != name]
        for s in specs:
            for spec in s if isinstance(s, (tuple, list)) else [s]:
                if isinstance(spec, DTensorSpec) and not spec.placements[0].is_replicate():
                    return True
    return False


def comm_events(analysis: GraphAnalysis, sim, grad_reduce: list[str] | set[str] = (), *, bucket_cap: int = BUCKET_CAP_BYTES) -> list[CommEvent]:
    """Every collective of one training step (forward, backward, gradient reduction)."""
    grads = requires_grad_nodes(analysis)
    events: list[CommEvent] = []
    backward: list[CommEvent] = []
    for r in sim.redistributions:
        spec = sim.specs.get(r.source)
        spec = spec if isinstance(spec, DTensorSpec) else None
        if r.collective:
            moved = r.src if r.collective == "all_gather" else r.dst if r.collective == "reduce_scatter" else ""
            events.append(CommEvent(r.source, "forward", r.collective, _padded(r.nbytes, spec, moved),
                                    "boundary" if r.planned else "implicit"))
        if r.source not in grads or r.consumer == "output":
            continue
        kind = _adjoint(analysis, sim, r)
        if kind:
            moved = r.dst if kind in ("all_gather", "reduce_scatter") and r.dst.startswith("Shard") else r.src
            backward.append(CommEvent(r.source, "backward", kind, _padded(r.nbytes, spec, moved), "adjoint of " + (r.collective or "a local layout change")))
    for r in sim.op_collectives:
        if r.consumer == "expert_parallel":  # rows out and back; the backward sends their gradients the reverse way
            events.append(CommEvent(r.source, "forward", r.collective, r.nbytes, "expert " + r.src))
            if r.src != "counts":
                backward.append(CommEvent(r.source, "backward", r.collective, r.nbytes, "adjoint of expert " + r.src))
            continue
        events.append(CommEvent(r.source, "forward", r.collective, r.nbytes, "loss parallel"))
    events += reversed(backward)
    events += gradient_reductions(analysis, sim, set(grad_reduce), bucket_cap)
    return events


def _adjoint(analysis, sim, r) -> str | None:
    """The collective the backward of forward redistribution `r` runs on the gradient."""
    src, dst = r.src, r.dst
    if dst.startswith("Shard"):
        if src.startswith("Shard"):
            return "all_to_all" if src != dst else None
        return "all_gather"  # the gradient arrives sharded like the output; the input wants it whole
    if not dst.startswith("Replicate") or src.startswith("Partial"):
        return None  # Megatron's g: the all-reduced value's gradient is already whole
    consumers = [u.name for u in analysis.nodes[r.source].users] if r.planned else [r.consumer]
    if not _partial_grad(analysis, sim, r.source, consumers):
        return None
    return "reduce_scatter" if src.startswith("Shard") else "all_reduce"


def gradient_reductions(analysis: GraphAnalysis, sim, grad_reduce: set[str], bucket_cap: int = BUCKET_CAP_BYTES) -> list[CommEvent]:
    """All-reduces of the Partial gradients of replicated parameters, bucketed like
    `distributed.parameters.GradReducer`: replicated parameters in backward order (latest first
    use first), packed up to `bucket_cap`; a bucket with any Partial gradient is one all-reduce."""
    if not grad_reduce:
        return []
    captured = analysis.captured
    order = {n.name: i for i, n in enumerate(analysis.graph.nodes)}
    first: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for ph, fqn in captured.param_fqns.items():
        node = analysis.nodes[ph]
        spec = sim.specs.get(ph)
        if fqn in captured.tied or not (isinstance(spec, DTensorSpec) and spec.placements[0].is_replicate()):
            continue
        sizes[fqn] = tensor_bytes(node.meta["val"])
        first[fqn] = min((order[u.name] for u in node.users), default=-1)
    buckets = pack_buckets(((f, sizes[f]) for f in sorted(sizes, key=lambda f: -first[f])), bucket_cap)
    out = []
    for b in buckets:
        members = [f for f in b if f in grad_reduce]
        if members:
            out.append(CommEvent(members[0], "backward", "all_reduce", sum(sizes[f] for f in members),
                                 f"Partial gradients of {len(members)} replicated parameter(s)"))
    return out


def comm_summary(events: list[CommEvent]) -> dict:
    out: dict = {}
    for phase in ("forward", "backward"):
        es = [e for e in events if e.phase == phase]
        out[phase] = {"bytes": sum(e.nbytes for e in es), "counts": _counts(es)}
    return out


def _counts(events) -> dict[str, int]:
    c: dict[str, int] = {}
    for e in events:
        c[e.collective] = c.get(e.collective, 0) + 1
    return dict(sorted(c.items()))


# ---- compute --------------------------------------------------------------------------------------
_NO_KERNEL = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.transpose.int, aten.permute.default,
              aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default, aten.slice.Tensor, aten.select.int,
              aten.t.default, aten.alias.default, aten.detach.default, aten.split.Tensor, aten.unflatten.int, aten.flatten.using_ints}


def node_flops(node) -> int:
    """Global FLOPs of one node (matmuls and attention; elementwise ops count 0, as FlopCounterMode)."""
    if node.op != "call_function":
        return 0
    if node.target is aten.linear.default:
        x, w = node.args[0].meta.get("val"), node.args[1].meta.get("val")
        if isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor):
            from autoshard.graph.simulate import hint

            rows = math.prod(hint(tuple(x.shape[:-1])))
            return 2 * rows * int(w.shape[0]) * int(w.shape[1])
        return 0
    if is_grouped_mm(node.target):  # each of the S rows meets one expert's [K, N]
        x, w = node.args[0].meta.get("val"), node.args[1].meta.get("val")
        if isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor):
            from autoshard.graph.simulate import hint

            return 2 * int(hint(x.shape[0])) * int(w.shape[-2]) * int(w.shape[-1])
        return 0
    if node.target in (aten.scaled_dot_product_attention.default, aten.matmul.default, aten.bmm.default, aten.mm.default, aten.addmm.default):
        return _counted_flops(node)
    return 0


def _counted_flops(node) -> int:
    from autoshard.graph.simulate import hint

    def shape(a):
        v = a.meta.get("val") if hasattr(a, "meta") else None
        return (tuple(hint(tuple(v.shape))), v.dtype) if isinstance(v, torch.Tensor) else None

    key = (node.target, tuple(shape(a) for a in node.args if hasattr(a, "meta")))
    return _flops_cached(key, tuple(a if not hasattr(a, "meta") else None for a in node.args[len(key[1]):])) if None not in key[1] else 0


@lru_cache(maxsize=4096)
def _flops_cached(key, rest) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    target, shapes = key
    args = [torch.empty(s, dtype=d, device="meta") for s, d in shapes]
    try:
        with FlopCounterMode(display=False) as counter:
            target(*args)
        return int(counter.get_total_flops())
    except Exception:  # noqa: BLE001 - an op the counter cannot run on meta: no FLOPs
        return 0


def _work_fraction(analysis: GraphAnalysis, sim, node) -> float:
    """Rank 0's share of the work: the smallest local share among the op's tensors (a Partial
    output holds full-size partial sums of a sharded contraction)."""
    fracs = []
    for s in [sim.specs.get(node.name)] + [sim.specs.get(a.name) for a in node.all_input_nodes]:
        for spec in s if isinstance(s, (tuple, list)) else [s]:
            if isinstance(spec, DTensorSpec):
                fracs.append(local_fraction(spec))
    return min(fracs, default=1.0)


def node_compute(analysis: GraphAnalysis, sim, node, profile: HardwareProfile) -> tuple[float, int, int]:
    """(forward seconds, local FLOPs, local bytes) of one node on rank 0."""
    if node.op != "call_function" or node.target in _NO_KERNEL or analysis.roles[node.name] in (Role.ASSERT, Role.OUTPUT):
        return 0.0, 0, 0
    if isinstance(node.target, torch._ops.HigherOrderOperator) or not isinstance(node.meta.get("val"), torch.Tensor):
        return 0.0, 0, 0
    frac = _work_fraction(analysis, sim, node)
    flops = int(node_flops(node) * frac)
    moved = tensor_bytes(node.meta.get("val")) * local_fraction(sim.specs.get(node.name))
    for a in node.all_input_nodes:
        moved += tensor_bytes(a.meta.get("val")) * local_fraction(sim.specs.get(a.name))
    moved = int(moved)
    dtype = node.meta["val"].dtype
    return compute_time(flops, moved, profile, dtype if dtype.is_floating_point else torch.float32), flops, moved


BACKWARD_FACTOR = 2.0  # backward ~ 2x forward: dgrad + wgrad matmuls, ~2x elementwise traffic


def compute_times(analysis: GraphAnalysis, sim, profile: HardwareProfile, nodes=None) -> dict[str, float]:
    """Forward + backward seconds per node (rank 0)."""
    grads = requires_grad_nodes(analysis)
    out = {}
    for node in analysis.graph.nodes if nodes is None else nodes:
        t, _, _ = node_compute(analysis, sim, node, profile)
        t *= 1.0 + (BACKWARD_FACTOR if node.name in grads else 0.0)
        if profile.dispatch_overhead_s and _dispatched(sim, node):
            # host time of eager DTensor dispatch, views included: the op forward, its backward
            t += profile.dispatch_overhead_s
            if node.name in grads:
                bwd = profile.dispatch_backward_s
                t += profile.dispatch_overhead_s if bwd is None else bwd
        if t:
            out[node.name] = t
    return out


def _dispatched(sim, node) -> bool:
    """Does this node run through DTensor's dispatcher (a DTensor among its outputs)?"""
    if node.op != "call_function":
        return False
    spec = sim.specs.get(node.name)
    return any(isinstance(s, DTensorSpec) for s in (spec if isinstance(spec, (tuple, list)) else [spec]))


ASSUMPTIONS = ("forward + backward of one step at the example shape; Adam (2 fp32 moments); communication not "
               "overlapped with compute; backward compute = 2x forward; compute includes the profile's eager "
               "DTensor dispatch time per op (calibrated profiles)")


def estimate_record(profile: HardwareProfile, tp: int, compute: float, comm: float, memory, communication: dict) -> dict:
    """`plan.estimate`'s layout, whether priced on the whole graph or scaled from a few layers."""
    return {
        "hardware": profile.name,
        "tp": tp,
        "time_s": {"compute": compute, "communication": comm, "total": compute + comm},
        "memory_bytes": memory.as_dict(),
        "communication": communication,
        "assumptions": ASSUMPTIONS,
    }
