import json

import pytest

from autoshard.cost import collective_time, get_profile
from autoshard.cli.calibrate import fit_alpha_busbw, main

SIZES = [4096 * 4**i for i in range(7)]


def test_fit_recovers_exact_parameters():
    for kind, factor in (("all_reduce", 1.0), ("all_gather", 0.5)):
        pts = [(s, 120e-6 + factor * s / 2e9) for s in SIZES]
        alpha, bw = fit_alpha_busbw(kind, 2, pts)
        assert alpha == pytest.approx(120e-6, rel=1e-6)
        assert bw == pytest.approx(2e9, rel=1e-6)


def test_fit_shrugs_off_one_hiccup():
    pts = [(s, 120e-6 + s / 2e9) for s in SIZES]
    pts[1] = (pts[1][0], pts[1][1] * 8)  # a 4 ms scheduler stall on one small message
    pts[-1] = (pts[-1][0], pts[-1][1] * 4)  # a neighbour's load on the biggest one
    alpha, bw = fit_alpha_busbw("all_reduce", 2, pts)
    assert alpha == pytest.approx(120e-6, rel=0.05)
    assert bw == pytest.approx(2e9, rel=0.05)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    from autoshard.__main__ import main as cli  # the documented `autoshard calibrate --out ...`

    out = tmp_path_factory.mktemp("cal") / "cpu.json"
    assert cli(["calibrate", "--out", str(out), "--quick", "--reps", "3"]) == 0
    return out


def test_quick_calibration_writes_a_loadable_profile(calibrated):
    p = get_profile(calibrated)
    assert p.name == "cpu-gloo-calibrated"
    for kind in ("all_reduce", "all_gather", "reduce_scatter"):
        alpha, bw = p.intra_node.per_kind[kind]
        assert 0 < alpha < 0.1, kind  # a loopback collective takes between 0 and 100 ms
        assert 1e6 < bw < 1e12, kind  # and moves between 1 MB/s and 1 TB/s
        assert collective_time(kind, 1 << 20, 2, p.intra_node) > alpha
    assert p.peak_flops["float32"] > 1e8
    assert p.mem_bw_bytes_per_s > 1e8
    assert 0 < p.launch_overhead_s < 1e-3
    assert 0 <= p.dispatch_overhead_s < 1e-2  # eager DTensor host time per op, beyond the kernel
    # its backward runs the autograd engine and a DTensor op per input gradient: it costs more
    assert p.dispatch_overhead_s < p.dispatch_backward_s < 1e-2
    assert type(p).from_json(p.to_json()) == p
    raw = json.loads(calibrated.read_text())["measurements"]
    assert len(raw["comm"]["all_reduce"]) >= 2
