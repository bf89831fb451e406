"""`activation_checkpointing="auto"`'s choice (`choose/recompute.py`) on priced estimates."""

from __future__ import annotations

import math

import pytest

from autoshard.choose.recompute import budget_bytes, choose_recompute
from autoshard.schema.errors import PlanError

MiB = 2**20
ESTIMATE = {
    "memory_bytes": {"total": 100 * MiB, "activations": 40 * MiB},   # state: 60 MiB
    "recompute": {"none": {"activations": 40 * MiB, "recompute_s": 0.0},
                  "selective": {"activations": 30 * MiB, "recompute_s": 0.004},   # -2.5 MiB for 1 ms per layer
                  "full": {"activations": 8 * MiB, "recompute_s": 0.040}},        # -8 MiB for 10 ms per layer
}


def test_a_budget_the_plan_meets_recomputes_nothing():
    kinds, record = choose_recompute(ESTIMATE, 100 * MiB, 4)
    assert kinds == ["none"] * 4 and record["recompute_s"] == 0.0


def test_the_cheapest_mix_that_fits():
    # 95 MiB: 5 MiB to save. Two selective layers (5 MiB, 2 ms) beat one full layer (8 MiB, 10 ms)
    kinds, record = choose_recompute(ESTIMATE, 95 * MiB, 4)
    assert sorted(kinds) == ["none", "none", "selective", "selective"], kinds
    assert record["memory_total"] <= 95 * MiB and math.isclose(record["recompute_s"], 0.002)
    # 88 MiB: 12 MiB to save: selective on all four gives 10; one full + two selective 13 MiB at 12 ms
    kinds, record = choose_recompute(ESTIMATE, 88 * MiB, 4)
    assert kinds.count("full") == 1 and kinds.count("selective") == 2, kinds


def test_a_budget_even_full_recompute_misses_is_refused():
    with pytest.raises(PlanError, match="even recomputing every layer fully needs 68.0 MiB"):
        choose_recompute(ESTIMATE, 60 * MiB, 4)


def test_budget_bytes():
    assert budget_bytes(None, ESTIMATE) == math.inf and budget_bytes("none", ESTIMATE) == math.inf
    assert budget_bytes("2GiB", ESTIMATE) == 2 * 2**30
    assert budget_bytes("device", {"budget": {"device_bytes": 80 * 2**30}}) == 80 * 2**30
