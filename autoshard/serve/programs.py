"""The prefill and decode programs of a sharded model, sharing its parameters and one KV cache.

`CachedPrograms(sharded, batch, capacity)` plans `CachedLM` (the model with its cache as state)
twice with the sharded module's options, its parameters pinned where they already are: once for
a prompt (any length >= 2: the sequence dim stays dynamic) and once for one token (a decode
step: the sequence is 1, so the cost model has no sequence to split). Both programs read the
sharded module's own parameter objects and write one cache, laid out by the plan: split by KV
heads where attention is, whole where K/V are replicated (tp > KV heads).

The programs run lowered to local tensors (compiled where the sharded module is compiled);
compiled, the decode program sees the same shapes every token (the cache is static, the slot
is a tensor), so it compiles once.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager

import torch
from torch.distributed.tensor import DTensor, Placement, Shard

from autoshard.execute.module import Program, ShardedModule
from autoshard.execute.rewrite import state_placements
from autoshard.execute.runners import LoweredExecution
from autoshard.schema.errors import PlanError
from autoshard.schema.placements import parse_placement, placement_str
from autoshard.serve.static_cache import CachedLM, cache_shapes

PREFILL_EXAMPLE = 8   # the prompt length the prefill program is captured at (its length stays dynamic)


class CachedPrograms:
    def __init__(self, sharded: ShardedModule, batch: int, capacity: int):
        planner = getattr(sharded, "planner", None)
        if planner is None:
            raise PlanError("generate needs a module made by autoshard() (it plans the cached programs with its options)")
        if sharded.device_mesh.ndim > 1:
            raise PlanError(f"generate runs on a tensor-parallel mesh only; this module is sharded over {sharded.device_mesh} "
                            "(FSDP over data-parallel dims): call autoshard(model, tp_mesh) for serving")
        self.batch, self.capacity = batch, capacity
        skeleton = planner.skeleton
        shapes = cache_shapes(skeleton, batch, capacity, sharded.tp_mesh.device_type)
        self.kv_heads, self.notes = shapes[0][0][1], []
        placed = {f: p.placement for f, p in sharded.plan.params.items()}
        repeat = kv_repeat(sharded.plan, self.kv_heads, sharded.tp_mesh.size())
        try:
            cached, prefill, decode = self._plan(planner, skeleton, shapes, placed, repeat)
        except Exception as e:  # noqa: BLE001 - the repeated layout is an optimisation; the whole cache is exact
            if repeat == 1:
                raise
            self.notes.append(f"KV heads not repeated to tp ({e}); the cache holds every KV head on every rank")
            repeat = 1
            cached, prefill, decode = self._plan(planner, skeleton, shapes, placed, repeat)
        self.kv_repeat = repeat
        shapes = cached.shapes   # as stored: KV heads repeated `repeat` times
        self.placements = state_placements(prefill.captured, prefill.simulation)
        _check_same_cache(self.placements, state_placements(decode.captured, decode.simulation))

        module = ShardedModule(cached, sharded.device_mesh, sharded.tp_mesh, replan=planner.pinned_to(placed, skeleton=cached),
                               execution=_execution_like(sharded))
        for fqn, p in sharded.named_parameters(remove_duplicate=False):
            module.adopt(fqn, p)
        for fqn, b in sharded.named_buffers(remove_duplicate=False):
            module.adopt(fqn, b, buffer=True, persistent=False)
        device = torch.device(sharded.tp_mesh.device_type)
        for fqn, (shape, dtype) in _cache_buffers(shapes).items():
            module.adopt(fqn, _cache_tensor(shape, dtype, device, self.placements.get(fqn), sharded.tp_mesh), buffer=True, persistent=False)
        module.add_program(prefill)
        module.add_program(decode)
        self.module = module
        self.shapes = shapes
        layout = self.cache_layout()
        for program in module.programs:   # each plan's report shows the cache it writes
            program.plan.estimate = {**(program.plan.estimate or {}), "kv_cache": layout}

    def _plan(self, planner, skeleton, shapes, placed, repeat):
        cached = CachedLM(skeleton, self.batch, self.capacity, shapes, kv_repeat=repeat)
        # The cost model prices training steps; a generation step has no backward and keeps no
        # activations, so sequence parallelism would only turn each all-reduce into a
        # reduce-scatter + all-gather: prefill is planned without it unless the module asked for it.
        sp = True if planner.sequence_parallel else False
        prefill = planner.build(self.example(PREFILL_EXAMPLE), pinned=placed, skeleton=cached, sequence_parallel=sp)
        with _quiet_specialisation():   # a decode step is one token by design: export's 0/1 note is noise
            decode = planner.build(self.example(1), pinned=placed, skeleton=cached, sequence_parallel=False)
        return cached, prefill, decode

    @property
    def prefill(self) -> Program:
        return self.module.programs[0]

    @property
    def decode(self) -> Program:
        return self.module.programs[1]

    def example(self, seq: int) -> tuple:
        ids = torch.zeros(self.batch, seq, dtype=torch.long)
        mask = torch.ones(self.batch, self.capacity, dtype=torch.long)
        positions = torch.arange(seq).expand(self.batch, seq).contiguous()
        return ids, mask, positions, torch.arange(seq)

    def __call__(self, ids, mask, positions, slots) -> torch.Tensor:
        return self.module(ids, mask, positions, slots)

    def cache_layout(self) -> dict:
        """How the cache is laid out and what it costs each rank (`Plan.report` shows it)."""
        tp = self.module.tp_mesh.size()
        kinds = sorted({placement_str(p) if (p := self.placements.get(f)) is not None else "plain" for f in _cache_buffers(self.shapes)})
        kv_heads = self.kv_heads
        split = all(k.startswith("Shard(1)") for k in kinds)
        if split and self.kv_repeat > 1:
            why = (f"{kv_heads} KV heads < tp {tp}: K/V replicated, each KV head stored on the {self.kv_repeat} ranks whose "
                   f"query heads read it, 1 of {kv_heads} KV heads per rank")
        elif split:
            why = f"split by KV heads with the attention: {kv_heads // tp} of {kv_heads} KV heads per rank"
        else:
            why = (f"whole on every rank: the keys/values written are replicated ({kv_heads} KV heads, tp {tp}"
                   + (f" > {kv_heads}: K/V replicated" if tp > kv_heads else "") + ")")
        sizes = self.cache_bytes()
        decode = self.decode.plan
        return {"batch": self.batch, "slots": self.capacity, "layers": len(self.shapes), "kv_heads": kv_heads,
                "dtype": str(self.shapes[0][2]).replace("torch.", ""), "placements": kinds, "why": why,
                "bytes_per_rank": sizes["per_rank"], "bytes_per_token": sizes["per_token"], "bytes_per_sequence": sizes["per_sequence"],
                "decode_collectives": decode.collective_counts(),
                "decode_collective_bytes": sum(b.bytes for b in decode.boundaries if b.collective)}

    def report(self) -> str:
        """The serving plan: the cache, then the decode step's plan (collectives by name)."""
        from autoshard.schema.report import kv_cache_lines

        return "\n".join(kv_cache_lines(self.decode.plan.estimate["kv_cache"]) + ["", self.decode.plan.report()])

    def cache_bytes(self) -> dict[str, int]:
        """Bytes of the cache each rank holds by the plan (shapes and placements), and per token
        of every sequence (all layers)."""
        tp, local = self.module.tp_mesh.size(), 0
        for fqn, (shape, dtype) in _cache_buffers(self.shapes).items():
            p = self.placements.get(fqn)
            local += math.prod(shape) * dtype.itemsize // (tp if p is not None and p.is_shard() else 1)
        return {"per_rank": local, "per_token": local // (self.batch * self.capacity), "per_sequence": local // self.batch}

    def held_bytes(self) -> int:
        """Bytes of cache this rank actually stores (its local tensors)."""
        total = 0
        for fqn in _cache_buffers_of(self.module):
            t = self.module.get_buffer(fqn)
            t = t._local_tensor if isinstance(t, DTensor) else t
            total += t.numel() * t.element_size()
        return total


@contextmanager
def _quiet_specialisation():
    log = logging.getLogger("torch._export.non_strict_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _execution_like(sharded: ShardedModule):
    """Compiled where the module is compiled; otherwise lowered, eagerly: generation needs no
    backward, and the local program skips DTensor's dispatch on every op of every token (a
    program the lowering cannot express runs on DTensors, as `lowering_notes` says)."""
    kind = sharded.execution.kind
    if kind == "compiled":
        return LoweredExecution(sharded.execution.options)
    if kind not in ("dtensor", "lowered"):
        raise PlanError(f"generate runs on DTensor, lowered or compiled modules; this one runs {kind!r}")
    return LoweredExecution(None)


def _cache_buffers(shapes) -> dict[str, tuple[tuple, torch.dtype]]:
    out = {}
    for i, (k, v, dtype) in enumerate(shapes):
        out[f"{CachedLM.CACHE}.keys_{i}"] = (k, dtype)
        out[f"{CachedLM.CACHE}.values_{i}"] = (v, dtype)
    return out


def _cache_buffers_of(module) -> list[str]:
    return [f for f, _ in module.named_buffers() if f.startswith(CachedLM.CACHE + ".")]


def _cache_tensor(shape, dtype, device, placement: Placement | None, mesh) -> torch.Tensor:
    """A zero cache buffer, this rank's shard of it where the plan splits it."""
    if placement is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    local = list(shape)
    if placement.is_shard():
        d = placement.dim
        if shape[d] % mesh.size():
            raise PlanError(f"cache dim {d} of size {shape[d]} does not split evenly over tp {mesh.size()}")
        local[d] //= mesh.size()
    return DTensor.from_local(torch.zeros(local, dtype=dtype, device=device), mesh, [placement], run_check=False,
                              shape=torch.Size(shape), stride=torch.empty(shape, device="meta").stride())


def kv_repeat(plan, kv_heads: int, tp: int) -> int:
    """How many times to store each KV head so the cache splits by heads over tp: tp / KV heads
    when tp > KV heads and the plan splits attention by heads (K/V replicated); else 1."""
    heads_split = bool(plan.attention) and all(parse_placement(p) == Shard(1) for p in plan.attention.values())
    if tp > kv_heads and tp % kv_heads == 0 and heads_split:
        return tp // kv_heads
    return 1


def _check_same_cache(prefill: dict, decode: dict) -> None:
    diff = sorted(f for f in set(prefill) | set(decode) if prefill.get(f) != decode.get(f))
    if diff:
        f = diff[0]
        raise PlanError(f"the prefill and decode plans lay out the KV cache differently ({f}: {prefill.get(f)} vs "
                        f"{decode.get(f)}); one cache serves both, so generate cannot run this plan")
