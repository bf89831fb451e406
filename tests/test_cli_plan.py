"""`autoshard plan` (issue 6): the cost model's numbers reach the printed summary and the JSON."""

from __future__ import annotations

import json

import pytest

from autoshard.__main__ import main
from autoshard.cli.plan import parse_mesh
from autoshard.schema.plan import Plan
from autoshard.scale.memory import param_bytes_per_rank
from autoshard.schema.units import format_bytes as _bytes


def test_plan_prints_the_cost_models_numbers_for_h100(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--config", "llama-3.1-8b", "--mesh", "tp=8", "--seq", "1024", "--quiet", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    plan = Plan.from_json(out.read_text())
    est = plan.estimate
    assert est["hardware"] == "h100-sxm" and "hardware h100-sxm" in text   # the default --hardware, not cpu-gloo
    assert "not estimated" not in text and "plan.estimate" not in text
    t = est["time_s"]
    assert (f"{t['total'] * 1e3:.1f} ms per step = compute {t['compute'] * 1e3:.1f} ms + tp communication "
            f"{t['communication'] * 1e3:.1f} ms (cost model, h100-sxm") in text
    m = est["memory_bytes"]
    for label, key in (("parameters", "params"), ("gradients", "grads"), ("AdamW state", "optimizer"), ("activations", "activations")):
        assert f"{label:<12} {_bytes(int(m[key])):>12}  (cost model)" in text
    assert m["total"] == m["params"] + m["grads"] + m["optimizer"] + m["activations"]
    # the plan covers all 32 layers, and its estimate is for all of them (scaled from 4)
    assert "model.layers.31.mlp.down_proj.weight" in plan.params
    assert est["scaled"]["n_layers"] == 32 and est["scaled"]["captured_layers"] == 4
    assert est["memory_bytes"]["params"] == param_bytes_per_rank(plan)[0]   # exact (tests/test_scale.py)
    assert "planned 4 of 32 identical layers of model.layers, grown to all 32" in text


def test_two_meshes_and_dp(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["plan", "--config", "qwen2.5-0.5b", "--mesh", "tp=2", "--mesh", "dp=4,tp=2", "--seq", "256", "--quiet", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("autoshard plan: Qwen2ForCausalLM") == 2
    assert "mesh {'dp': 4, 'tp': 2}" in text
    assert Plan.from_json((tmp_path / "p-tp2.json").read_text()).mesh["tp"] == 2
    assert Plan.from_json((tmp_path / "p-dp4-tp2.json").read_text()).mesh["shape"] == [4, 2]


def test_byte_memory_budget_is_passed_and_plans_every_layer(capsys):
    assert main(["plan", "--config", "tiny-llama", "--set", "num_hidden_layers=6", "--mesh", "tp=2", "--seq", "16",
                 "--memory-budget", "1GiB", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "planned the full model: memory_budget='1GiB' bounds the whole model's memory" in text


@pytest.mark.parametrize("text, expected", [("tp=8", (("tp",), (8,))), ("8", (("tp",), (8,))), ("dp=16,tp=8", (("dp", "tp"), (16, 8)))])
def test_parse_mesh(text, expected):
    assert parse_mesh(text) == expected


def test_parse_mesh_refuses_bad_input():
    for bad in ("tp=0", "dp=2,pp=2", "tp=2,tp=2", "tp=x"):
        with pytest.raises(SystemExit):
            parse_mesh(bad)


def test_json_is_plain_data(tmp_path):
    out = tmp_path / "plan.json"
    assert main(["plan", "--config", "tiny-qwen3", "--mesh", "tp=2", "--seq", "8", "--quiet", "--json", str(out)]) == 0
    raw = json.loads(out.read_text())
    assert raw["estimate"]["hardware"] == "h100-sxm" and raw["mesh"]["tp"] == 2
