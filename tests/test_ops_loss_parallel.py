"""vocab_parallel_cross_entropy on real gloo ranks: value/grad == F.cross_entropy, O(N) comms only.

Every rank seeds identically, builds the same full logits/target, shards the logits on the vocab
dim and compares against plain F.cross_entropy on the full tensors. Each `ranks.run` call batches
many cases so the shared rank pool is busy for well under 5 s.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.utils._python_dispatch import TorchDispatchMode

from autoshard.ops import vocab_parallel_cross_entropy

ATOL, RTOL = 1e-6, 1e-6
ALL_REDUCE = torch.ops.c10d_functional.all_reduce  # CommDebugMode reports native funcol ops under legacy keys

_MESHES: dict[tuple[int, ...], object] = {}


def _mesh(shape: tuple[int, ...]):
    """One mesh per shape per rank process (2-D meshes create gloo subgroups: do it once)."""
    if shape not in _MESHES:
        _MESHES[shape] = init_device_mesh("cpu", shape)
    return _MESHES[shape]


class _CollectiveShapes(TorchDispatchMode):
    """Records (op, shape) of every functional collective run on plain tensors."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor desugar into local ops (and collectives) first
        ns = func.namespace
        name = func._overloadpacket.__name__
        # collectives only: not wait_tensor nor the helper _wrap_tensor_autograd that funcol now emits
        if ns in ("_c10d_functional", "c10d_functional", "c10d") and not name.startswith(("wait", "_")):
            self.calls.append((name, tuple(args[0].shape)))
        return func(*args, **(kwargs or {}))


def _make(shape, vocab, ignore_frac, ignore_index, seed):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(*shape, vocab, generator=g) * 3.0
    target = torch.randint(0, vocab, shape, generator=g)
    if ignore_frac > 0:
        target[torch.rand(shape, generator=g) < ignore_frac] = ignore_index
    upstream = torch.randn(shape, generator=g)  # grad for reduction='none'
    return full, target, upstream


def _run_case(mesh, placements, shape, vocab, reduction, *, ignore_frac=0.3, ignore_index=-100, ls=0.0, seed=0,
              target_dtensor=False):
    """Runs one case under CommDebugMode; asserts value and grad; returns (comm counts, collective shapes)."""
    full, target, upstream = _make(shape, vocab, ignore_frac, ignore_index, seed)
    logits = distribute_tensor(full, mesh, placements, src_data_rank=None).requires_grad_()
    tgt = target
    if target_dtensor:
        tgt = distribute_tensor(target, mesh, [Replicate()] * mesh.ndim, src_data_rank=None)

    ref_reduction = {0: "none", 1: "mean", 2: "sum"}.get(reduction, reduction)  # aten enum -> F name
    comm, rec = CommDebugMode(), _CollectiveShapes()
    with comm, rec:
        out = vocab_parallel_cross_entropy(logits, tgt, reduction=reduction, ignore_index=ignore_index,
                                           label_smoothing=ls)
        if ref_reduction != "none":
            (out.to_local() * 1.7).backward()
    if ref_reduction == "none":  # compare/backprop on the full tensor, outside the counted region
        got = out.full_tensor()
        (got * upstream).sum().backward()
    else:
        got = out.to_local()

    ref_logits = full.clone().requires_grad_()
    ref = F.cross_entropy(ref_logits.reshape(-1, vocab), target.reshape(-1), reduction=ref_reduction,
                          ignore_index=ignore_index, label_smoothing=ls)
    if ref_reduction == "none":
        ref = ref.reshape(shape)
        (ref * upstream).sum().backward()
    else:
        (ref * 1.7).backward()

    assert isinstance(out, DTensor)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    if not [p for p in placements if isinstance(p, Shard) and p.dim % len(full.shape) != len(shape)]:
        assert all(isinstance(p, Replicate) for p in out.placements), out.placements
    torch.testing.assert_close(got, ref.detach(), atol=ATOL, rtol=RTOL, equal_nan=True)
    grad = logits.grad
    assert isinstance(grad, DTensor) and grad.placements == logits.placements
    torch.testing.assert_close(grad.full_tensor(), ref_logits.grad, atol=ATOL, rtol=RTOL)
    return {str(k): v for k, v in comm.get_comm_counts().items()}, rec.calls


def _assert_row_stat_comms(counts, calls, n_rows, n_sums, extra=()):
    """Exactly: all-reduce MAX of [N], one all-reduce SUM of [n_sums, N], plus `extra` shapes."""
    assert counts == {str(ALL_REDUCE): 2 + len(extra)}, counts
    assert calls == [("all_reduce", (n_rows,)), ("all_reduce", (n_sums, n_rows)), *[("all_reduce", s) for s in extra]], calls


def _cases_1d(ws, vocabs):
    mesh = _mesh((ws,))
    seen = []
    seed = 0
    for vocab in vocabs:
        for reduction in ("mean", "sum", "none"):
            for ls in (0.0, 0.1):
                for shape in ((6,), (2, 3)):
                    seed += 1
                    counts, calls = _run_case(mesh, [Shard(-1)], shape, vocab, reduction, ls=ls, seed=seed)
                    _assert_row_stat_comms(counts, calls, math.prod(shape), 3 if ls else 2)
                    seen.append((vocab, reduction, ls, shape))
    # ignore_index inside the vocab range, aten-style integer reduction enum, target given as DTensor
    counts, calls = _run_case(mesh, [Shard(1)], (7,), vocabs[-1], 1, ignore_index=1, ignore_frac=0.0, seed=99,
                              target_dtensor=True)
    _assert_row_stat_comms(counts, calls, 7, 2)
    return len(seen), dist.get_rank()


def _all_ignored_and_edge_cases():
    mesh = _mesh((dist.get_world_size(),))
    for ls in (0.0, 0.2):
        # mean over zero non-ignored rows -> nan (like torch), grad exactly zero
        counts, _ = _run_case(mesh, [Shard(1)], (5,), 10, "mean", ignore_frac=1.0, ls=ls, seed=7)
        assert counts == {str(ALL_REDUCE): 2}
        for red in ("sum", "none"):
            _run_case(mesh, [Shard(1)], (5,), 10, red, ignore_frac=1.0, ls=ls, seed=8)
    # no rows at all
    _run_case(mesh, [Shard(1)], (0,), 10, "mean", seed=9)
    _run_case(mesh, [Shard(1)], (0,), 10, "none", seed=9)
    # unbatched [V] logits with scalar target
    _run_case(mesh, [Shard(0)], (), 10, "none", ignore_frac=0.0, seed=10)
    return True


def _local_shapes(vocab):
    mesh = _mesh((dist.get_world_size(),))
    logits = distribute_tensor(torch.zeros(2, vocab), mesh, [Shard(1)], src_data_rank=None)
    return logits.to_local().shape[1]


def _cases_2d():
    """(2, 2) mesh: vocab on mesh dim 1, batch sharded (unevenly) or replicated on mesh dim 0."""
    mesh = _mesh((2, 2))
    for reduction in ("mean", "sum", "none"):
        for ls in (0.0, 0.1):
            # batch replicated on dim 0: the same 2 all-reduces, all within the vocab group
            counts, calls = _run_case(mesh, [Replicate(), Shard(1)], (5,), 7, reduction, ls=ls, seed=11)
            _assert_row_stat_comms(counts, calls, 5, 3 if ls else 2)
            # batch sharded on dim 0: N=5 -> local rows 3/2; mean/sum add one tiny all-reduce over dp
            counts, calls = _run_case(mesh, [Shard(0), Shard(1)], (5,), 7, reduction, ls=ls, seed=12)
            n_local = 3 if mesh.get_coordinate()[0] == 0 else 2
            extra = {"mean": [(2,)], "sum": [(1,)], "none": []}[reduction]
            _assert_row_stat_comms(counts, calls, n_local, 3 if ls else 2, extra)
    # vocab on mesh dim 0, batch on mesh dim 1, leading dims, target as a DTensor
    _run_case(mesh, [Shard(2), Shard(0)], (3, 2), 5, "mean", seed=13, target_dtensor=True)
    _run_case(mesh, [Shard(2), Shard(1)], (2, 3), 5, "none", seed=14)
    return True


def _error_cases():
    mesh1 = _mesh((dist.get_world_size(),))
    mesh2 = _mesh((2, 2))
    full, target = torch.randn(4, 8), torch.randint(0, 8, (4,))
    logits = distribute_tensor(full, mesh1, [Shard(1)], src_data_rank=None)
    with pytest.raises(NotImplementedError, match="weight"):
        vocab_parallel_cross_entropy(logits, target, weight=torch.ones(8))
    with pytest.raises(ValueError, match="reduction"):
        vocab_parallel_cross_entropy(logits, target, reduction="avg")
    with pytest.raises(ValueError, match="target shape"):
        vocab_parallel_cross_entropy(logits, target[:3])
    with pytest.raises(NotImplementedError, match="floating point"):
        vocab_parallel_cross_entropy(logits, torch.rand(4, 8).softmax(-1))
    partial = DTensor.from_local(full, mesh1, [Partial()], run_check=False)
    with pytest.raises(NotImplementedError, match="Partial"):
        vocab_parallel_cross_entropy(partial, target)
    two_vocab = distribute_tensor(full, mesh2, [Shard(1), Shard(1)], src_data_rank=None)
    with pytest.raises(NotImplementedError, match="exactly one mesh dim"):
        vocab_parallel_cross_entropy(two_vocab, target)
    with pytest.raises(TypeError, match="DTensor"):
        vocab_parallel_cross_entropy(full, target)
    with pytest.raises(RuntimeError, match="target out of"):
        vocab_parallel_cross_entropy(logits, torch.tensor([0, 1, 8, 2]))
    return True


def test_ws2_divisible_and_uneven_vocab(ranks2):
    # V=8 splits 4/4, V=7 splits 4/3
    assert ranks2.run(_cases_1d, 2, (8, 7)) == [(24, 0), (24, 1)]


def test_ws4_uneven_and_zero_column_vocab(ranks4):
    # torch.chunk layouts: V=10 -> 3/3/3/1, V=3 -> 1/1/1/0 (rank 3 holds no columns), V=16 -> 4 each
    assert ranks4.run(_local_shapes, 10) == [3, 3, 3, 1]
    assert ranks4.run(_local_shapes, 3) == [1, 1, 1, 0]
    assert ranks4.run(_cases_1d, 4, (16, 10, 3)) == [(36, r) for r in range(4)]


def test_ignored_rows_empty_and_unbatched(ranks2, ranks4):
    assert ranks2.run(_all_ignored_and_edge_cases) == [True] * 2
    assert ranks4.run(_all_ignored_and_edge_cases) == [True] * 4


def test_2d_mesh_batch_and_vocab_sharded(ranks4):
    assert ranks4.run(_cases_2d) == [True] * 4


def test_errors(ranks4):
    assert ranks4.run(_error_cases) == [True] * 4


def _compiled_fullgraph():
    """The op traces into one graph (DTensor in, functional collectives inside the autograd.Function)."""
    mesh = _mesh((dist.get_world_size(),))
    full, target, _ = _make((6,), 10, 0.3, -100, seed=21)
    logits = distribute_tensor(full, mesh, [Shard(1)], src_data_rank=None).requires_grad_()
    fn = torch.compile(lambda x, t: vocab_parallel_cross_entropy(x, t, label_smoothing=0.1), backend="aot_eager",
                       fullgraph=True)
    out = fn(logits, target)
    out.to_local().backward()
    ref_logits = full.clone().requires_grad_()
    ref = F.cross_entropy(ref_logits, target, label_smoothing=0.1)
    ref.backward()
    torch.testing.assert_close(out.to_local(), ref.detach(), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(logits.grad.full_tensor(), ref_logits.grad, atol=ATOL, rtol=RTOL)
    return True


@pytest.mark.slow  # first torch.compile in a rank costs several seconds
def test_torch_compile_fullgraph(ranks2):
    assert ranks2.run(_compiled_fullgraph) == [True] * 2
