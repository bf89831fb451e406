"""Training for real on a 2-D mesh (world size 4 as dp=2 x tp=2, gloo): autoshard on "tp" plus
FSDP2 on "dp" takes the same AdamW steps as one process on the whole batch; loss parallel never
moves logits; the optimizer step needs fewer collectives than the hand-written plan; the example
script trains under torchrun."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from autoshard.distributed.mesh import free_port
from tests.helpers import ATOL, full, inputs, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mesh_2d():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))


def _dp_slice(batch: dict, mesh) -> dict:
    """This rank's share of a global batch: split over dp, the same within a tp group."""
    dp, rank = mesh["dp"].size(), mesh["dp"].get_local_rank()
    n = next(iter(batch.values())).shape[0] // dp
    return {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}


def _dp_mean(x: torch.Tensor, mesh) -> float:
    import torch.distributed as dist

    x = full(x).detach().clone()
    dist.all_reduce(x, group=mesh["dp"].get_group())
    return x.item() / mesh["dp"].size()


# ---- five AdamW steps with clipping == single process on the full batch --------------------------
def _train_like_single_process(name: str, steps: int = 5):
    import autoshard

    warnings.filterwarnings("ignore")
    mesh = _mesh_2d()
    model = tiny_model(name)
    ref = copy.deepcopy(model)
    batches = [inputs(model.config.vocab_size, 4, 8, seed=10 + i, labels=True) for i in range(steps)]
    sharded = autoshard.autoshard(model, mesh, example_inputs=_dp_slice(batches[0], mesh))
    opt = torch.optim.AdamW(sharded.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    loss_diff = norm_diff = 0.0
    clipped = 0
    for batch in batches:
        loss = sharded(**_dp_slice(batch, mesh)).loss
        full(loss).backward()
        norm = torch.nn.utils.clip_grad_norm_(sharded.parameters(), max_norm=0.5)
        opt.step()
        opt.zero_grad()
        ref_loss = ref(**batch).loss
        ref_loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm=0.5)
        ref_opt.step()
        ref_opt.zero_grad()
        loss_diff = max(loss_diff, abs(_dp_mean(loss, mesh) - ref_loss.item()))
        norm_diff = max(norm_diff, abs(full(norm).item() - ref_norm.item()))
        clipped += ref_norm.item() > 0.5
    ref_params = dict(ref.named_parameters())
    param_diff = max((full(p.detach()) - ref_params[n].detach()).abs().max().item() for n, p in sharded.named_parameters())
    placements = {type(p).__name__ + str(p.device_mesh.mesh_dim_names) for p in sharded.parameters()}
    return loss_diff, norm_diff, param_diff, clipped, placements, sharded.grad_reducer.reductions


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_adamw_with_clipping_matches_single_process(ranks4, name):
    for loss_diff, norm_diff, param_diff, clipped, placements, reductions in ranks4.run(_train_like_single_process, name):
        assert loss_diff < ATOL and norm_diff < ATOL, (loss_diff, norm_diff)
        # Adam divides by sqrt(v): 5 steps amplify last-bit gradient differences up to ~lr * 1e-3
        assert param_diff < 1e-5, param_diff
        assert clipped == 5  # clipping was active on every step
        assert placements == {"DTensor('dp', 'tp')"}  # every parameter FSDP-sharded over dp, TP over tp
        assert reductions == 5 * 3  # Partial norm grads: one all-reduce per layer + one for the root, per step


# ---- loss parallel: no batch x seq x vocab collective, loss equals unsharded -----------------------
def _collective_sizes(labels: bool):
    from torch.utils._python_dispatch import TorchDispatchMode

    import autoshard

    class CollectiveSizes(TorchDispatchMode):
        """Largest tensor each functional collective takes or returns (CommDebugMode only counts)."""

        def __init__(self):
            super().__init__()
            self.sizes: list[tuple[str, int]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.namespace == "_c10d_functional" and func.__name__.startswith(("all_", "reduce_scatter", "broadcast")):
                tensors = [t for t in (*args, out) if isinstance(t, torch.Tensor)]
                self.sizes.append((func.__name__, max(t.numel() for t in tensors)))
            return out

    warnings.filterwarnings("ignore")
    mesh = _mesh_2d()
    model = tiny_model("tiny-llama")
    ref = copy.deepcopy(model)
    batch = _dp_slice(inputs(model.config.vocab_size, 4, 16, seed=5, labels=True), mesh)
    batch["labels"][:, :5] = -100  # ignored positions (a prompt): mean over the rest
    if not labels:
        batch.pop("labels")
    sharded = autoshard.autoshard(model, mesh, example_inputs=batch)
    mode = CollectiveSizes()
    with mode:
        out = sharded(**batch)
        (out.loss if labels else full(out.logits).float().pow(2).mean()).backward()
    b, s = batch["input_ids"].shape
    loss_diff = abs(full(out.loss).item() - ref(**batch).loss.item()) if labels else None
    return mode.sizes, b * s * model.config.vocab_size, loss_diff


def test_loss_parallel_moves_no_logits_and_equals_unsharded_loss(ranks4):
    for sizes, logits_numel, loss_diff in ranks4.run(_collective_sizes, True):
        assert loss_diff < ATOL, loss_diff  # ignore_index and mean as unsharded, on this rank's batch
        # the largest activation collective is a hidden-state all-gather, not the (sharded) logits
        assert max(n for _, n in sizes) < logits_numel // 2, sizes
    # the recorder does see logits: without labels they are gathered once for the caller
    sizes, logits_numel, _ = ranks4.run(_collective_sizes, False)[0]
    assert sum(n == logits_numel for _, n in sizes) == 1, sizes


# ---- optimizer-step communication vs the hand-written plan ---------------------------------------
def _optimizer_step_collectives():
    import contextlib

    from torch.distributed.device_mesh import init_device_mesh

    import autoshard
    from autoshard.testing.hand_plan import apply_hand_plan, count_collectives, hand_plan_context

    warnings.filterwarnings("ignore")
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    model = tiny_model("tiny-llama")
    ref, hand = copy.deepcopy(model), copy.deepcopy(model)
    batch = inputs(model.config.vocab_size, 2, 8, seed=3, labels=True)
    sharded = autoshard.autoshard(model, mesh, example_inputs=batch)
    apply_hand_plan(hand, mesh, sequence_parallel=True, loss_parallel=True)
    ref(**batch).loss.backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0).item()
    counts, norms = {}, {}
    for tag, m, ctx in (("autoshard", sharded, contextlib.nullcontext), ("hand", hand, lambda: hand_plan_context(hand))):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        with ctx():
            loss = m(**batch).loss

        def backward():
            with ctx():
                loss.backward()

        def clip():
            with ctx():
                norms[tag] = full(torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)).item()

        def step():
            with ctx():
                opt.step()

        counts[tag] = {"backward": count_collectives(backward), "clip": count_collectives(clip), "step": count_collectives(step)}
    return counts, norms, ref_norm, model.config.num_hidden_layers


def test_optimizer_step_needs_fewer_collectives_than_hand_plan(ranks2):
    counts, norms, ref_norm, layers = ranks2.run(_optimizer_step_collectives)[0]
    auto, hand = counts["autoshard"], counts["hand"]
    # clip_grad_norm_ works on the sharded parameters (transformers#36296) and is exact
    assert abs(norms["autoshard"] - ref_norm) < ATOL and abs(norms["hand"] - ref_norm) < ATOL
    # autoshard: the 2L+1 Partial norm grads are summed in backward in one bucket; clipping
    # then needs only its own norm all-reduce and the step none
    assert auto["backward"].get("all_reduce") == 1
    assert auto["clip"] == {"all_reduce": 1} and auto["step"] == {}
    # the hand plan leaves them Partial: each read by clip or AdamW all-reduces again
    assert hand["step"]["all_reduce"] >= 2 * layers + 1
    total = {tag: sum(sum(c.values()) for c in phases.values()) for tag, phases in counts.items()}
    assert total["autoshard"] < total["hand"], counts


# ---- the example script under torchrun ------------------------------------------------------------
def test_example_trains_under_torchrun(tmp_path):
    ckpt = tmp_path / "ckpt"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port", str(free_port()),
        os.path.join(ROOT, "examples", "train.py"), "--steps", "12", "--checkpoint", str(ckpt),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"^step\s+\d+\s+loss ([\d.]+)", proc.stdout, re.M)]
    assert len(losses) == 12, proc.stdout
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses  # falling
    assert "dp=2 x tp=2" in proc.stdout

    # the checkpoint it saved loads into a plain single-process model (no process group)
    import torch.distributed.checkpoint as dcp

    plain = tiny_model("tiny-llama", seed=0)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    state = plain.state_dict()
    dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    plain.load_state_dict(state)
    assert set(state) == set(before)
    assert not torch.equal(plain.model.norm.weight, before["model.norm.weight"])  # trained weights
