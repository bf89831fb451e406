"""From-scratch initialisation of a model built on `meta`, in its shards (`autoshard.init_weights`).

Every parameter must equal what the unsharded model's own init gives under the same seed
(transformers' `initialize_weights`), so replicated ones are identical on every rank; a
parameter no initialiser writes is refused, naming it.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.helpers import full, inputs, tiny_model


def _reference(name: str, seed: int):
    """The unsharded model initialised by transformers under `seed` (flags reset: a fresh init)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(tiny_model(name).config)
    for m in model.modules():
        m._is_hf_initialized = False
    torch.manual_seed(seed)
    model.initialize_weights()
    return model


def _init(name: str, dims: tuple[int, ...]) -> dict:
    import transformers
    from torch.distributed.device_mesh import init_device_mesh

    import autoshard

    warnings.filterwarnings("ignore")
    cfg = tiny_model(name).config
    mesh = init_device_mesh("cpu", dims, mesh_dim_names=("dp", "tp")[-len(dims):])
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(cfg)
    kw = inputs(cfg.vocab_size, 2, 8, labels=True)
    sharded = autoshard.autoshard(meta, mesh, example_inputs=kw)
    torch.manual_seed(4)
    autoshard.init_weights(sharded, meta)
    ref = _reference(name, 4)
    got = {k: full(v) for k, v in sharded.state_dict().items()}
    diff = {k: (got[k] - v).abs().max().item() for k, v in ref.state_dict().items() if k in got}
    loss = full(sharded(**kw).loss)
    return {"worst": max(diff.values()), "compared": len(diff), "meta_left": any(p.is_meta for p in meta.parameters()),
            "loss": abs(loss.item() - ref(**kw).loss.item())}


def test_init_weights_equals_the_unsharded_init_at_tp2(ranks2):
    for r in ranks2.run(_init, "tiny-llama", (2,)):
        assert r["worst"] == 0.0 and r["compared"] == 21 and r["meta_left"], r
        assert r["loss"] < 1e-5, r


def test_init_weights_tied_on_dp2_tp2(ranks4):
    # Qwen2: the LM head is the embedding (written by both modules' initialisers, the last wins)
    for r in ranks4.run(_init, "tiny-qwen2", (2, 2)):
        assert r["worst"] == 0.0 and r["loss"] < 1e-5, r


class _Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)
        self.gain = torch.nn.Parameter(torch.ones(8))   # no reset_parameters writes it

    def forward(self, x):
        return self.down(torch.relu(self.up(x))) * self.gain


def _unwritten() -> dict:
    import autoshard
    from tests.helpers import tp_mesh

    warnings.filterwarnings("ignore")
    with torch.device("meta"):
        model = _Scaled()
    sharded = autoshard.autoshard(model, tp_mesh(), example_inputs=(torch.randn(2, 8),))
    out = {}
    try:
        autoshard.init_weights(sharded, model)
    except autoshard.PlanError as e:
        out["refused"] = str(e)

    def init(m):
        if isinstance(m, torch.nn.Linear):
            m.reset_parameters()
        elif isinstance(m, _Scaled):
            torch.nn.init.ones_(m.gain)

    torch.manual_seed(0)
    autoshard.init_weights(sharded, model, init=init)
    out["gain"] = full(sharded.get_parameter("gain")).tolist()
    return out


def test_a_parameter_no_initialiser_writes_is_refused(ranks2):
    for r in ranks2.run(_unwritten):
        assert "gain" in r["refused"] and "init=" in r["refused"], r
        assert r["gain"] == [1.0] * 8
