"""Checkpoints into the shards of a model built on `meta` (`autoshard.load`), on real gloo.

The model is built on `meta` (no rank ever holds it whole), sharded, and filled from a
transformers `save_pretrained` directory or a DCP checkpoint: logits, loss and one AdamW step
must equal the same checkpoint loaded whole (`from_pretrained`). The rotary `inv_freq` buffers,
in no checkpoint, are recomputed; a buffer autoshard cannot compute is refused, not used.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.helpers import full, inputs, max_grad_diff, tiny_model

EXACT = 1e-5


def _meta(name: str):
    import transformers

    cfg = tiny_model(name).config
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(cfg)


def _write(name: str, path: str, dtype=torch.float32) -> None:
    """Rank 0 writes the checkpoint every rank then reads (random weights, trained a step, so
    norms and biases differ from their inits)."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        model = tiny_model(name, seed=7)
        kw = inputs(model.config.vocab_size, 2, 8, seed=3, labels=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model(**kw).loss.backward()
        opt.step()
        model.to(dtype).save_pretrained(path)
    dist.barrier()


def _step_and_compare(sharded, whole, kw) -> dict:
    out, ref = sharded(**kw), whole(**kw)
    res = {"logits": (full(out.logits) - ref.logits).abs().max().item(), "loss": abs(full(out.loss).item() - ref.loss.item())}
    full(out.loss).backward()
    ref.loss.backward()
    res["grads"], res["no_grad"] = max_grad_diff(sharded, whole)
    for model in (sharded, whole):
        # Adam's first step is lr * g / (|g| + eps): a gradient difference d (rounding, ~2e-7 here)
        # moves the step by up to lr * d / eps; eps=1e-4 keeps that under 1e-5 (eps=1e-6 gave 1.4e-5)
        torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-4).step()
    mine = {k: full(v).detach() for k, v in sharded.state_dict().items()}
    res["step"] = max((mine[k] - v).abs().max().item() for k, v in whole.state_dict().items() if k in mine)
    return res


def _from_pretrained_dir(name: str, path: str, dims: tuple[int, ...]) -> dict:
    import transformers
    from torch.distributed.device_mesh import init_device_mesh

    import autoshard

    warnings.filterwarnings("ignore")
    _write(name, path)
    mesh = init_device_mesh("cpu", dims, mesh_dim_names=("dp", "tp")[-len(dims):])
    meta = _meta(name)
    kw = inputs(meta.config.vocab_size, 2, 8, seed=11, labels=True)  # every rank the same batch
    sharded = autoshard.autoshard(meta, mesh, example_inputs=kw, checkpoint=path)
    whole = transformers.AutoModelForCausalLM.from_pretrained(path).train()
    res = _step_and_compare(sharded, whole, kw)
    res["on_meta"] = [n for n, t in list(sharded.named_parameters()) + list(sharded.named_buffers()) if t.is_meta]
    res["inv_freq"] = (sharded.get_buffer("model.rotary_emb.inv_freq") - whole.model.rotary_emb.inv_freq).abs().max().item()
    return res


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_meta_model_loads_save_pretrained_shards_at_tp2(ranks2, tmp_path, name):
    # Qwen2: the LM head tied to the embedding (save_pretrained writes it once) and q/k/v biases
    for r in ranks2.run(_from_pretrained_dir, name, str(tmp_path / "hf"), (2,)):
        assert r["on_meta"] == [] and r["inv_freq"] == 0.0
        assert r["logits"] < EXACT and r["loss"] < EXACT and r["grads"] < EXACT and r["step"] < EXACT, r


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-mixtral"])
def test_meta_model_loads_save_pretrained_on_dp2_tp2(ranks4, tmp_path, name):
    # Mixtral under FSDP: the last layer's transposed expert weights are read after its last
    # direct parameter use; its stage must still hold them gathered (a crash before)
    for r in ranks4.run(_from_pretrained_dir, name, str(tmp_path / "hf"), (2, 2)):
        assert r["on_meta"] == [] and r["inv_freq"] == 0.0
        assert r["logits"] < EXACT and r["loss"] < EXACT and r["grads"] < EXACT and r["step"] < EXACT, r


def _from_dcp(path: str, name: str, dims: tuple[int, ...]) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    import autoshard

    warnings.filterwarnings("ignore")
    mesh = init_device_mesh("cpu", dims, mesh_dim_names=("dp", "tp")[-len(dims):])
    whole = tiny_model(name, seed=5)
    kw = inputs(whole.config.vocab_size, 2, 8, seed=11, labels=True)
    saver = autoshard.autoshard(tiny_model(name, seed=5), mesh, example_inputs=kw)
    dcp.save(saver.state_dict(), checkpoint_id=path)
    sharded = autoshard.load(autoshard.autoshard(_meta(name), mesh, example_inputs=kw), path)
    return _step_and_compare(sharded, whole, kw)


@pytest.mark.parametrize("name", ["tiny-llama", pytest.param("tiny-qwen2", marks=pytest.mark.slow)])
def test_meta_model_loads_a_dcp_checkpoint(ranks2, tmp_path, name):
    for r in ranks2.run(_from_dcp, str(tmp_path / "dcp"), name, (2,)):
        assert r["logits"] < EXACT and r["loss"] < EXACT and r["grads"] < EXACT and r["step"] < EXACT, r


@pytest.mark.parametrize("name", ["tiny-qwen2", pytest.param("tiny-llama", marks=pytest.mark.slow)])
def test_meta_model_loads_a_dcp_checkpoint_on_dp2_tp2(ranks4, tmp_path, name):
    for r in ranks4.run(_from_dcp, str(tmp_path / "dcp"), name, (2, 2)):
        assert r["logits"] < EXACT and r["loss"] < EXACT and r["grads"] < EXACT and r["step"] < EXACT, r


def _to_empty_trap(path: str) -> dict:
    """The torch route a user takes: `to_empty`, then `dcp.load` from the safetensors directory.
    `to_empty` used to leave `inv_freq` as garbage (logits off by ~5e-3)."""
    import torch.distributed.checkpoint as dcp
    import transformers

    import autoshard
    from tests.helpers import tp_mesh

    warnings.filterwarnings("ignore")
    _write("tiny-llama", path)
    whole = transformers.AutoModelForCausalLM.from_pretrained(path).train()
    kw = inputs(whole.config.vocab_size, 2, 8, seed=11, labels=True)
    sharded = autoshard.autoshard(tiny_model("tiny-llama"), tp_mesh(), example_inputs=kw)
    sharded.to_empty(device="cpu")
    dcp.load(sharded.state_dict(), storage_reader=dcp.HuggingFaceStorageReader(path))
    return {"logits": (full(sharded(**kw).logits) - whole(**kw).logits).abs().max().item()}


def test_to_empty_keeps_non_persistent_buffers(ranks2, tmp_path):
    for r in ranks2.run(_to_empty_trap, str(tmp_path / "hf")):
        assert r["logits"] < EXACT, r


def _bf16_into_fp32(path: str) -> dict:
    import transformers

    import autoshard
    from tests.helpers import tp_mesh

    warnings.filterwarnings("ignore")
    _write("tiny-llama", path, dtype=torch.bfloat16)
    whole = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    kw = inputs(whole.config.vocab_size, 2, 8, seed=11)
    sharded = autoshard.autoshard(_meta("tiny-llama"), tp_mesh(), example_inputs=kw, checkpoint=path)
    dtypes = {p.dtype for p in sharded.parameters()}
    state = sharded.state_dict()
    return {"dtypes": sorted(map(str, dtypes)),
            "weights": max((full(state[k]) - v).abs().max().item() for k, v in whole.state_dict().items() if k in state)}


def test_bf16_checkpoint_into_fp32_shards(ranks2, tmp_path):
    for r in ranks2.run(_bf16_into_fp32, str(tmp_path / "hf")):
        assert r["dtypes"] == ["torch.float32"] and r["weights"] == 0.0, r


def _strided_round_trip(path: str) -> dict:
    """Mixtral's fused experts hold `_StridedShard(1, sf=2)` (each rank: its slice of gate and of
    up): DCP saves and loads them block by block, into the same mesh and into the plain model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor

    import autoshard
    from tests.helpers import tp_mesh

    warnings.filterwarnings("ignore")
    model = tiny_model("tiny-mixtral", seed=2)
    kw = inputs(model.config.vocab_size, 2, 8)
    saved = autoshard.autoshard(model, tp_mesh(), example_inputs=kw)
    state = saved.state_dict()
    strided = sorted(k for k, v in state.items() if isinstance(v, DTensor) and "StridedShard" in str(v.placements))
    dcp.save(state, checkpoint_id=path)
    expect = {k: full(v) for k, v in state.items()}
    other = autoshard.load(autoshard.autoshard(tiny_model("tiny-mixtral", seed=3), tp_mesh(), example_inputs=kw), path)
    plain = tiny_model("tiny-mixtral", seed=4).state_dict()
    dcp.load(plain, checkpoint_id=path)
    got = {k: full(v) for k, v in other.state_dict().items()}
    return {"strided": strided, "sharded": all(torch.equal(got[k], expect[k]) for k in expect),
            "plain": all(torch.equal(plain[k], expect[k]) for k in expect)}


def test_strided_shards_round_trip_through_dcp(ranks2, tmp_path):
    for r in ranks2.run(_strided_round_trip, str(tmp_path / "dcp")):
        assert r["strided"] == ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.gate_up_proj"]
        assert r["sharded"] and r["plain"], r


def _unequal_parts_round_trip(path: str) -> dict:
    """Phi-3's `qkv_proj` holds q | k | v of unequal widths, each split over tp (`StridedParts`):
    DCP and a transformers checkpoint read and write it in the model's own row order."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    import transformers
    from torch.distributed.tensor import DTensor

    import autoshard
    from tests.families import build_tiny, example_inputs
    from tests.helpers import tp_mesh

    warnings.filterwarnings("ignore")
    model, cfg = build_tiny("phi3", seed=2)
    kw = example_inputs(cfg)
    state = autoshard.autoshard(model, tp_mesh(), example_inputs=kw).state_dict()
    parts = sorted(k for k, v in state.items() if isinstance(v, DTensor) and "StridedParts" in str(v.placements))
    dcp.save(state, checkpoint_id=f"{path}/dcp")
    expect = {k: full(v) for k, v in state.items()}
    other = autoshard.load(autoshard.autoshard(build_tiny("phi3", seed=3)[0], tp_mesh(), example_inputs=kw), f"{path}/dcp")
    plain = build_tiny("phi3", seed=4)[0].state_dict()
    dcp.load(plain, checkpoint_id=f"{path}/dcp")
    if dist.get_rank() == 0:
        model.save_pretrained(f"{path}/hf")
    dist.barrier()
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(cfg)
    hub = autoshard.autoshard(skeleton, tp_mesh(), example_inputs=kw, checkpoint=f"{path}/hf").state_dict()
    same = lambda got: all(torch.equal(full(got[k]), expect[k]) for k in expect)  # noqa: E731
    return {"parts": parts, "dcp": same(other.state_dict()), "plain": same(plain), "hub": same(hub)}


def test_unequal_fused_parts_round_trip_through_dcp_and_hub_checkpoints(ranks2, tmp_path):
    for r in ranks2.run(_unequal_parts_round_trip, str(tmp_path)):
        assert r["parts"] == ["model.layers.0.self_attn.qkv_proj.weight", "model.layers.1.self_attn.qkv_proj.weight"]
        assert r["dcp"] and r["plain"] and r["hub"], r


def _refusals(path: str) -> dict:
    import autoshard
    from tests.helpers import tp_mesh

    warnings.filterwarnings("ignore")
    out = {}
    # a non-persistent buffer autoshard cannot compute (not a transformers module): refused at the call
    with torch.device("meta"):
        model = _RotaryMLP()
    x = torch.randn(2, 4, 8)
    sharded = autoshard.autoshard(model, tp_mesh(), example_inputs=(x,))
    sharded.to_empty(device="cpu")
    try:
        sharded(x)
    except autoshard.PlanError as e:
        out["unset"] = str(e)
    # built under meta_init, the same buffer is computed by the model's own code: exact
    torch.manual_seed(0)
    with autoshard.meta_init():
        lazy = _RotaryMLP()
    out["meta_init"] = (lazy.up.weight.is_meta, lazy.scale.is_meta)
    # a checkpoint without one of the model's tensors is refused before anything is read, naming it
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file

    if dist.get_rank() == 0:
        tiny_model("tiny-llama").save_pretrained(path)
        tensors = load_file(f"{path}/model.safetensors")
        del tensors["model.layers.1.mlp.down_proj.weight"]
        save_file(tensors, f"{path}/model.safetensors", metadata={"format": "pt"})
    dist.barrier()
    try:
        autoshard.autoshard(_meta("tiny-llama"), tp_mesh(), example_inputs=inputs(32, 2, 8), checkpoint=path)
    except autoshard.PlanError as e:
        out["missing"] = str(e)
    return out


class _RotaryMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)
        self.register_buffer("scale", torch.arange(1, 9, dtype=torch.float32) / 8, persistent=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x * self.scale)))


def test_unset_buffers_and_missing_tensors_are_refused(ranks2, tmp_path):
    for r in ranks2.run(_refusals, str(tmp_path / "cut")):
        assert "scale" in r["unset"] and "meta_init" in r["unset"], r
        assert r["meta_init"] == (True, False)
        assert "has no model.layers.1.mlp.down_proj.weight" in r["missing"], r


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-qwen3-moe"])
def test_hub_layout_moe_checkpoint_into_fused_expert_shards(ranks2, tmp_path, name):
    # save_pretrained writes per-expert tensors (Mixtral: block_sparse_moe.experts.N.w1/w2/w3);
    # the model holds fused gate_up_proj [E, 2I, H] split part by part, down_proj [E, H, I]
    for r in ranks2.run(_from_pretrained_dir, name, str(tmp_path / "hf"), (2,)):
        assert r["on_meta"] == [] and r["inv_freq"] == 0.0
        assert r["logits"] < EXACT and r["loss"] < EXACT and r["grads"] < EXACT and r["step"] < EXACT, r
