"""Checkpoints with torch.distributed.checkpoint: `ShardedModule.state_dict()` has the original
keys with DTensor values, so a checkpoint saved from dp=2 x tp=2 (FSDP2 + TP) loads into (a) the
same mesh, (b) another tensor-parallel size, (c) the plain unsharded model — equal tensors."""

from __future__ import annotations

import warnings

import torch

from tests.helpers import ATOL, full, inputs, tiny_model


def _load(module: torch.nn.Module, path: str) -> dict:
    import torch.distributed.checkpoint as dcp

    state = module.state_dict()
    dcp.load(state, checkpoint_id=path)
    module.load_state_dict(state)
    return {k: full(v).detach() for k, v in module.state_dict().items()}


def _compare(got: dict, expect: dict) -> tuple[bool, bool]:
    return list(got) == list(expect), all(torch.equal(got[k], expect[k]) for k in expect)


def _round_trip(path: str, name: str):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    import autoshard

    warnings.filterwarnings("ignore")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = tiny_model(name)
    keys = list(model.state_dict())
    vocab = model.config.vocab_size
    mine = inputs(vocab, 2, 8, seed=20 + mesh["dp"].get_local_rank(), labels=True)  # this dp rank's batch
    common = inputs(vocab, 2, 8, seed=30, labels=True)  # one batch for every rank

    sharded = autoshard.autoshard(model, mesh, example_inputs=mine)
    opt = torch.optim.AdamW(sharded.parameters(), lr=1e-2)
    full(sharded(**mine).loss).backward()
    opt.step()  # saved weights differ from every fresh init below
    state = sharded.state_dict()
    dcp.save(state, checkpoint_id=path)
    expect = {k: full(v).detach().clone() for k, v in state.items()}
    expect_loss = full(sharded(**mine).loss).item()
    out = {"keys": list(state) == keys, "dtensors": all(type(v).__name__ == "DTensor" for v in state.values())}

    # (a) same mesh, another init
    a = autoshard.autoshard(tiny_model(name, seed=1), mesh, example_inputs=mine)
    out["same_mesh"] = _compare(_load(a, path), expect)
    out["same_mesh_loss"] = abs(full(a(**mine).loss).item() - expect_loss)

    # (b) tensor parallel over all 4 ranks (K/V replicated: 2 KV heads), no data parallelism
    tp4 = init_device_mesh("cpu", (4,), mesh_dim_names=("tp",))
    b = autoshard.autoshard(tiny_model(name, seed=1), tp4, example_inputs=common)
    out["tp4"] = _compare(_load(b, path), expect)

    # (c) the plain model, every rank reading the whole checkpoint
    plain = tiny_model(name, seed=1)
    out["plain"] = _compare(_load(plain, path), expect)
    out["tp4_vs_plain_loss"] = abs(full(b(**common).loss).item() - plain(**common).loss.item())
    return out


def test_dcp_round_trips_across_meshes_and_into_plain_model(ranks4, tmp_path):
    # Qwen2: tied embeddings (one parameter under two keys) and q/k/v biases
    for out in ranks4.run(_round_trip, str(tmp_path / "ckpt"), "tiny-qwen2"):
        assert out["keys"] and out["dtensors"]
        assert out["same_mesh"] == (True, True)
        assert out["tp4"] == (True, True)
        assert out["plain"] == (True, True)
        assert out["same_mesh_loss"] < ATOL and out["tp4_vs_plain_loss"] < ATOL
