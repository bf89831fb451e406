import pytest
import torch
import torch.distributed as dist


def _allreduce_rank():
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_world_size(), t.item()


def _fail_on_rank1():
    if dist.get_rank() == 1:
        raise RuntimeError("boom on rank 1")
    return "ok"


def test_pool_runs_real_gloo_collectives(ranks2, ranks4):
    assert ranks2.run(_allreduce_rank) == [(2, 3.0)] * 2
    assert ranks4.run(_allreduce_rank) == [(4, 10.0)] * 4


def test_pool_reports_rank_failure_and_recovers(ranks2):
    with pytest.raises(AssertionError, match=r"(?s)rank 1:.*boom on rank 1"):
        ranks2.run(_fail_on_rank1)
    assert ranks2.run(_allreduce_rank) == [(2, 3.0)] * 2
