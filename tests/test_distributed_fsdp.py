"""FSDP2 composed with autoshard's tensor parallelism: per-layer units found by structure, the
one-liner equals `autoshard(model, mesh_2d)`, FSDP's collectives are per layer, mixed precision."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from tests.handwritten import TinyLM
from tests.helpers import ATOL, comm_counts, full, inputs, tiny_model


# ---- units: the repeating structure, whatever the names -----------------------------------------
@pytest.mark.parametrize(
    "make,units",
    [
        (lambda: tiny_model("tiny-llama"), ["model.layers.0", "model.layers.1"]),
        (lambda: tiny_model("tiny-mixtral"), ["model.layers.0", "model.layers.1"]),  # not the experts
        (lambda: TinyLM(depth=3), ["stack.0", "stack.1", "stack.2"]),
        (lambda: TinyLM(depth=1), []),
    ],
)
def test_repeating_units_by_structure(make, units):
    from autoshard.distributed.fsdp import repeating_units

    assert repeating_units(make()) == units


# ---- the two ways to compose, against the unsharded model ----------------------------------------
def _mesh_2d():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))


def _two_ways():
    from torch.distributed.fsdp import FSDPModule

    import autoshard
    from autoshard.schema.errors import PlanError
    from autoshard.distributed.fsdp import data_parallel, resolve_fsdp

    warnings.filterwarnings("ignore")
    mesh = _mesh_2d()
    model = tiny_model("tiny-llama")
    ref = copy.deepcopy(model)
    batch = inputs(model.config.vocab_size, 2, 7, seed=4 + mesh["dp"].get_local_rank(), labels=True)
    built = autoshard.autoshard(model, mesh, example_inputs=batch)
    composed = data_parallel(autoshard.autoshard(model, mesh["tp"], example_inputs=batch), mesh["dp"])
    out = {"fsdp": [isinstance(m, FSDPModule) for m in (built, composed)]}
    # fsdp=False leaves dp to the caller; fsdp=True needs a dp dim
    out["options"] = resolve_fsdp(mesh, False) is None and resolve_fsdp(mesh, None)["mesh"] == mesh["dp"]
    try:
        resolve_fsdp(mesh["tp"], True)
    except PlanError:
        out["options"] &= True
    else:
        out["options"] = False
    out["layers_fsdp"] = all(isinstance(built.get_submodule(f"model.layers.{i}"), FSDPModule) for i in range(2))
    losses, ref_loss = [full(m(**batch).loss) for m in (built, composed)], ref(**batch).loss
    out["loss_diff"] = max(abs(loss.item() - ref_loss.item()) for loss in losses)
    for loss in losses:
        loss.backward()
    ref_loss.backward()
    # FSDP averages gradients over dp: compare with the mean of both dp ranks' reference grads
    import torch.distributed as dist

    worst = 0.0
    ref_grads = dict(ref.named_parameters())
    for n, p in ref_grads.items():
        g = p.grad.clone()
        dist.all_reduce(g, group=mesh["dp"].get_group())
        g /= 2
        for m in (built, composed):
            worst = max(worst, (full(m.get_parameter(n).grad) - g).abs().max().item())
    out["grad_diff"] = worst
    # another input signature re-captures: the new program runs per layer under FSDP too
    logits = full(built(input_ids=batch["input_ids"]).logits)
    out["replan_logits_diff"] = (logits - ref(input_ids=batch["input_ids"]).logits).abs().max().item()
    out["programs"] = [type(p.runner).__name__ == "StagedRunner" for p in built.programs]
    return out


def test_autoshard_2d_and_one_liner_match_unsharded(ranks4):
    for out in ranks4.run(_two_ways):
        assert out["fsdp"] == [True, True] and out["options"]
        assert out["layers_fsdp"]
        assert out["loss_diff"] < ATOL and out["grad_diff"] < ATOL, (out["worst"], out["grad_diff"])
        assert out["replan_logits_diff"] < ATOL and out["programs"] == [True, True]


def _fused_parts_2d():
    """Phi-3's `gate_up_proj` (equal halves) and `qkv_proj` (q | k | v of unequal widths), split
    part by part over tp, under FSDP2 over dp: FSDP shards them on their other dim (on the parts'
    dim its `_StridedShard` nests in their layout and DTensor gathers them in the wrong order)."""
    import torch.distributed as dist

    import autoshard
    from tests.families import build_tiny, example_inputs

    warnings.filterwarnings("ignore")
    mesh = _mesh_2d()
    model, cfg = build_tiny("phi3")
    ref = copy.deepcopy(model)
    batch = example_inputs(cfg, seed=4 + mesh["dp"].get_local_rank())
    sharded = autoshard.autoshard(model, mesh, example_inputs=batch)
    loss, ref_loss = full(sharded(**batch).loss), ref(**batch).loss
    loss.backward()
    ref_loss.backward()
    worst, state = 0.0, sharded.state_dict()
    for n, p in ref.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g, group=mesh["dp"].get_group())
        worst = max(worst, (full(sharded.get_parameter(n).grad) - g / 2).abs().max().item())
    layer = "model.layers.0"
    fused = [f"{layer}.self_attn.qkv_proj.weight", f"{layer}.mlp.gate_up_proj.weight"]
    return {"plan": [sharded.plan.params[f].placement for f in fused],
            "fsdp": [str(sharded.get_parameter(f).placements) for f in fused],
            "loss_diff": abs(loss.item() - ref_loss.item()), "grad_diff": worst,
            "state": all(torch.equal(full(state[f]), ref.get_parameter(f).detach()) for f in fused)}


def test_fused_parts_under_fsdp_dp2_tp2(ranks4):
    for out in ranks4.run(_fused_parts_2d):
        assert out["plan"] == ["_StridedShard(0, parts=64|32|32)", "_StridedShard(0, sf=2)"], out
        assert all(p.startswith("(Shard(dim=1)") for p in out["fsdp"]), out
        assert out["loss_diff"] < ATOL and out["grad_diff"] < ATOL and out["state"], out


# ---- collectives: FSDP per layer over dp, the tensor-parallel program unchanged over tp ---------
def _collectives():
    import autoshard

    warnings.filterwarnings("ignore")
    mesh = _mesh_2d()
    model = tiny_model("tiny-llama")
    batch = inputs(model.config.vocab_size, 2, 8, seed=4, labels=True)
    sharded = autoshard.autoshard(model, mesh, example_inputs=batch)
    full(sharded(**batch).loss).backward()  # FSDP's lazy init
    sharded.zero_grad()
    fwd, loss = comm_counts(lambda: sharded(**batch).loss)
    bwd, _ = comm_counts(lambda: full(loss).backward())
    return fwd, bwd, model.config.num_hidden_layers


def test_fsdp_collectives_per_layer(ranks4):
    fwd, bwd, layers = ranks4.run(_collectives)[0]
    # over dp: one all-gather per layer and one for the root in forward; backward re-gathers the
    # layers (the root stays unsharded) and reduce-scatters every group's gradients
    assert fwd.pop("_allgather_base_") == layers + 1
    assert bwd.pop("_allgather_base_") == layers and bwd.pop("_reduce_scatter_base_") == layers + 1
    # over tp: exactly the 1-D program (tests/test_api.py), plus one bucketed all-reduce of the
    # norm weights' Partial gradients per layer and one for the root
    assert fwd == {"all_gather": 2 * layers + 1, "reduce_scatter": 2 * layers + 1, "all_reduce": 2}
    assert bwd.pop("all_reduce") == layers + 1
    assert bwd["reduce_scatter"] == 2 * layers + 1


# ---- mixed precision ------------------------------------------------------------------------------
def _mixed_precision():
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import autoshard

    warnings.filterwarnings("ignore")
    mesh = _mesh_2d()
    model = tiny_model("tiny-qwen2")
    ref = copy.deepcopy(model)
    batch = inputs(model.config.vocab_size, 2, 8, seed=4 + mesh["dp"].get_local_rank(), labels=True)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    sharded = autoshard.autoshard(model, mesh, example_inputs=batch, fsdp={"mp_policy": policy})
    opt = torch.optim.AdamW(sharded.parameters(), lr=1e-2)
    out = sharded(**batch)
    first = full(out.loss).item()
    full(out.loss).backward()
    dtypes = {str(p.dtype) for p in sharded.parameters()} | {str(p.grad.dtype) for p in sharded.parameters()}
    opt.step()
    opt.zero_grad()
    later = full(sharded(**batch).loss).item()
    return abs(first - ref(**batch).loss.item()), dtypes, str(out.logits.dtype), first, later


def test_mixed_precision_bf16_compute_fp32_master(ranks4):
    for diff, dtypes, logits_dtype, first, later in ranks4.run(_mixed_precision):
        assert diff < 2e-2, diff  # bf16 compute vs the fp32 model
        assert dtypes == {"torch.float32"}  # sharded weights and reduced grads stay fp32
        assert logits_dtype == "torch.bfloat16"
        assert later < first


# ---- a hand-written model: units found without names ----------------------------------------------
def _handwritten():
    import autoshard

    warnings.filterwarnings("ignore")
    mesh = _mesh_2d()
    torch.manual_seed(0)
    model = TinyLM()
    ref = copy.deepcopy(model)
    tokens = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(3))
    sharded = autoshard.autoshard(model, mesh, example_inputs=(tokens,))
    opt, ref_opt = torch.optim.SGD(sharded.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(2):
        full(sharded(tokens)).pow(2).mean().backward()
        ref(tokens).pow(2).mean().backward()
        opt.step(), ref_opt.step()
        opt.zero_grad(), ref_opt.zero_grad()
    ref_params = dict(ref.named_parameters())
    diff = max((full(p.detach()) - ref_params[n]).abs().max().item() for n, p in sharded.named_parameters())
    return diff, [s.unit for s in sharded.programs[0].runner.segments]


def test_handwritten_decoder_per_layer_fsdp(ranks4):
    diff, units = ranks4.run(_handwritten)[0]
    assert diff < ATOL
    assert units == [None, "stack.0", "stack.1", None]
