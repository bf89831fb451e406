"""FSDP2's stages on dp 2 x tp 2 run the lowered program, compiled per layer (`execute/staged.py`).

The lowered and compiled stages must give the eager DTensor stages' loss and every gradient,
with no fallback note, and the same tensor-parallel collectives the 1-D lowered program has.
"""

from __future__ import annotations

import warnings

import pytest

from tests.helpers import full, inputs, tiny_model


def _staged(name: str, modes: tuple[str, ...], recompute: str | None = None) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    import autoshard

    warnings.filterwarnings("ignore")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = tiny_model(name)
    kw = inputs(model.config.vocab_size, 2, 12, seed=3 + mesh["dp"].get_local_rank(), labels=True)
    out = {}
    for mode in modes:
        run = {"lower": True} if mode == "lowered" else {"compile": {"backend": "aot_eager"}} if mode == "compiled" else {}
        sharded = autoshard.autoshard(model, mesh, example_inputs=kw, activation_checkpointing=recompute, **run)
        loss = full(sharded(**kw).loss)
        loss.backward()
        out[mode] = {"loss": loss.item(), "grads": {n: full(p.grad).clone() for n, p in sharded.named_parameters()},
                     "kind": sharded.execution.kind, "notes": sharded.lowering_notes,
                     "lowered": [p is not None for p in sharded.lowered]}
    base = out[modes[0]]
    return {m: {"loss": abs(r["loss"] - base["loss"]), "kind": r["kind"], "notes": r["notes"], "lowered": r["lowered"],
                "grads": max((g - base["grads"][n]).abs().max().item() for n, g in r["grads"].items())}
            for m, r in out.items()}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral"])
def test_lowered_and_compiled_stages_equal_eager_on_dp2_tp2(ranks4, name):
    for r in ranks4.run(_staged, name, ("eager", "lowered", "compiled")):
        assert r["eager"]["kind"] == "staged"
        for mode in ("lowered", "compiled"):
            m = r[mode]
            assert m["kind"] == f"staged-{mode}" and m["notes"] == [] and all(m["lowered"]), (mode, m)
            assert m["loss"] < 1e-5 and m["grads"] < 1e-5, (mode, m)


@pytest.mark.slow
def test_compiled_stages_with_selective_recompute(ranks4):
    for r in ranks4.run(_staged, "tiny-llama", ("eager", "compiled"), "selective"):
        assert r["compiled"]["kind"] == "staged-compiled" and r["compiled"]["notes"] == []
        assert r["compiled"]["loss"] < 1e-5 and r["compiled"]["grads"] < 1e-5, r
