import math

import pytest

from autoshard.cost import LinkProfile, bus_factor, collective_time, get_profile, link_for


@pytest.mark.parametrize(
    "n, ar, ag",
    [(2, 1.0, 0.5), (4, 1.5, 0.75), (8, 1.75, 0.875)],
)
def test_bus_factors_match_nccl_tests(n, ar, ag):
    assert bus_factor("all_reduce", n) == pytest.approx(ar)
    assert bus_factor("all_gather", n) == pytest.approx(ag)
    assert bus_factor("reduce_scatter", n) == pytest.approx(ag)
    assert bus_factor("all_to_all", n) == pytest.approx(ag)
    assert bus_factor("broadcast", n) == 1.0


def test_collective_time_hand_computed():
    link = LinkProfile("t", alpha_s=10e-6, busbw_bytes_per_s=100e9)
    # all-reduce of 1 GB over 8 ranks: 10 us + 2*7/8 * 1e9 / 1e11 = 17.51 ms
    assert collective_time("all_reduce", 10**9, 8, link) == pytest.approx(0.01751)
    # all-gather to a 400 MB result over 4 ranks: 10 us + 3/4 * 4e8 / 1e11 = 3.01 ms
    assert collective_time("all_gather", 4 * 10**8, 4, link) == pytest.approx(0.00301)
    assert collective_time("broadcast", 10**9, 4, link) == pytest.approx(10e-6 + 0.01)


def test_ring_all_reduce_is_reduce_scatter_plus_all_gather():
    link = get_profile("h100").intra_node
    s, n = 64 * 2**20, 8
    rs_ag = collective_time("reduce_scatter", s, n, link) + collective_time("all_gather", s, n, link)
    assert math.isclose(collective_time("all_reduce", s, n, link), rs_ag - link.alpha_s)


def test_trivial_groups_and_empty_tensors_are_free():
    link = get_profile("a100").intra_node
    assert collective_time("all_reduce", 10**6, 1, link) == 0.0
    assert collective_time("all_gather", 0, 8, link) == 0.0


def test_per_kind_override_wins():
    link = LinkProfile("lo", alpha_s=1e-4, busbw_bytes_per_s=2e9, per_kind={"reduce_scatter": (5e-4, 5e8)})
    s = 8 * 2**20
    assert collective_time("reduce_scatter", s, 2, link) == pytest.approx(5e-4 + 0.5 * s / 5e8)
    assert collective_time("all_gather", s, 2, link) == pytest.approx(1e-4 + 0.5 * s / 2e9)


def test_errors():
    link = get_profile("h100").intra_node
    with pytest.raises(ValueError, match="all_gahter"):
        collective_time("all_gahter", 1024, 1, link)  # checked even when the group is trivial
    with pytest.raises(ValueError):
        bus_factor("all_reduce", 0)
    with pytest.raises(ValueError):
        collective_time("all_reduce", -1, 2, link)


def test_link_for_picks_inter_node_when_spanning():
    p = get_profile("h100")
    assert link_for(p, False) is p.intra_node
    assert link_for(p, True) is p.inter_node
    s = 256 * 2**20
    assert collective_time("all_reduce", s, 16, link_for(p, True)) > 5 * collective_time("all_reduce", s, 8, link_for(p, False))
