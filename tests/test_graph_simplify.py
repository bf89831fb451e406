"""`passes/simplify`: graph clean-ups after capture keep every value and every gradient of the
model, and leave the graph in a form the placement passes can see into."""

from __future__ import annotations

import copy

import torch
from torch import nn

from autoshard.graph import simplify

HOP = torch.ops.higher_order.wrap_with_set_grad_enabled


class NoGradRegions(nn.Module):
    """A table looked up under `no_grad` (Marian's sinusoidal positions) and a no-grad helper that
    passes its input through `.to()` of its own dtype (Dots3's indexer), whose caller keeps using it."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(16, 8)
        self.proj = nn.Linear(8, 8)
        self.score = nn.Linear(8, 1)

    @torch.no_grad()
    def scores(self, h):
        h = h.to(self.score.weight.dtype)  # returns `h` itself; export then traces the caller's h through here
        return self.score(h).argmax(-1), h

    def forward(self, x, ids):
        with torch.no_grad():
            pos = self.table(ids)
        h = self.proj(x + pos)
        best, h = self.scores(h)
        return (h * 2).sum() + best.float().sum()


def _exported(model, args):
    return torch.export.export(model, args, strict=False)


def _assert_same_values_and_input_grads(ep, model, x):
    """The rewritten program computes the model's output and its input's gradient."""
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expect = ep.module()(a), model(b)
    torch.testing.assert_close(out, expect)
    out.sum().backward()
    expect.sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


def _rewritten(model, rewrite) -> torch.fx.GraphModule:
    """`model` exported on a [2, 3, 8] input and rewritten by `rewrite` (which must change it);
    the rewritten program computes the model's values and input gradient."""
    x = torch.randn(2, 3, 8)
    ep = _exported(model, (x,))
    assert rewrite(ep.graph_module)
    ep.graph_module.graph.eliminate_dead_code()
    ep.graph_module.recompile()
    _assert_same_values_and_input_grads(ep, model, x)
    return ep.graph_module


def _grads(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def test_no_grad_regions_are_inlined_with_the_gradients_eager_has():
    torch.manual_seed(0)
    model = NoGradRegions()
    args = (torch.randn(2, 3, 8, requires_grad=True), torch.randint(0, 16, (2, 3)))
    ref = copy.deepcopy(model)
    ep = _exported(model, args)
    assert any(n.target is HOP for n in ep.graph_module.graph.nodes)
    assert simplify.inline_no_grad_regions(ep.graph_module)
    ep.graph_module.recompile()
    assert not any(n.target is HOP for n in ep.graph_module.graph.nodes)

    out = ep.module()(*args)
    expect = ref(*args)
    assert torch.equal(out, expect)
    out.backward()
    expect.backward()
    got, want = _grads(model), _grads(ref)
    assert want["table.weight"] is None and got["table.weight"] is None      # looked up under no_grad
    assert want["score.weight"] is None and got["score.weight"] is None      # only an argmax leaves the region
    assert want["proj.weight"] is not None                                    # ... but `h` flows on, with its gradient
    for name in ("proj.weight", "proj.bias"):
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


class EmptyCache(nn.Module):
    """XLM's cache: a 1-D empty tensor concatenated with 4-D keys (torch.cat's legacy rule)."""

    def forward(self, k):
        return torch.cat([torch.tensor([]), k], dim=-2) * 3


def test_empty_cat_operand_is_dropped():
    k = torch.randn(2, 4, 5, 8)
    ep = _exported(EmptyCache(), (k,))
    cats = [n for n in ep.graph_module.graph.nodes if n.target is torch.ops.aten.cat.default]
    assert len(cats[0].args[0]) == 2
    assert simplify.drop_empty_cat_inputs(ep.graph_module)
    ep.graph_module.recompile()
    assert len(cats[0].args[0]) == 1
    assert torch.equal(ep.module()(k), EmptyCache()(k))


class LogSigmoid(nn.Module):
    def forward(self, x):
        return torch.nn.functional.logsigmoid(x)


def test_log_sigmoid_becomes_softplus_with_equal_values_and_gradients():
    x = torch.tensor([-100.0, -20.5, -3.0, -1e-3, 0.0, 1e-3, 2.0, 20.5, 100.0])
    ep = _exported(LogSigmoid(), (x,))
    assert simplify.log_sigmoid_as_softplus(ep.graph_module)
    ep.graph_module.recompile()
    targets = {n.target for n in ep.graph_module.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.log_sigmoid.default not in targets and torch.ops.aten.softplus.default in targets
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expect = ep.module()(a), torch.nn.functional.logsigmoid(b)
    torch.testing.assert_close(out, expect, rtol=1e-6, atol=1e-7)
    out.sum().backward()
    expect.sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


class Updates(nn.Module):
    """`corrected += predictions` on a permuted projection (Gemma3n's AltUp), and a write through
    a slice whose base is read afterwards, which must stay a write."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, z):
        corrected = self.lin(x).permute(1, 0, 2)
        corrected += z
        a = self.lin(z)
        a[:, :2].mul_(2)
        return corrected.sum() + (a * a).sum()


def test_in_place_update_of_a_fresh_tensor_becomes_out_of_place_unless_an_alias_reads_it():
    torch.manual_seed(0)
    model = Updates()
    ref = copy.deepcopy(model)
    x, z = torch.randn(2, 3, 8), torch.randn(3, 2, 8)
    ep = _exported(model, (x, z))
    assert simplify.out_of_place_updates(ep.graph_module)
    ep.graph_module.recompile()
    targets = [n.target for n in ep.graph_module.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.add_.Tensor not in targets and torch.ops.aten.add.Tensor in targets
    assert torch.ops.aten.mul_.Tensor in targets  # `a` is read after the write through its slice
    out, expect = ep.module()(x, z), ref(x, z)
    torch.testing.assert_close(out, expect, rtol=0, atol=0)
    out.backward()
    expect.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, dict(ref.named_parameters())[name].grad, rtol=0, atol=0)


class Conv1D(nn.Module):
    """GPT-2's `Conv1D`: weight stored `[in, out]`, batch dims folded around an `addmm`."""

    def __init__(self, nx: int = 8, nf: int = 12):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        y = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return y.view(x.size()[:-1] + (self.weight.shape[1],)) + torch.addmm(self.bias, x[0], self.weight, beta=0.5)


def test_conv1d_addmm_becomes_a_linear_of_the_transposed_weight_without_the_fold():
    x = torch.randn(2, 3, 8)
    model = Conv1D()
    ep = _exported(model, (x,))
    assert simplify.addmm_as_linear(ep.graph_module)
    ep.graph_module.recompile()
    ops = [n.target for n in ep.graph_module.graph.nodes if n.op == "call_function"]
    linear = next(n for n in ep.graph_module.graph.nodes if n.target is torch.ops.aten.linear.default)
    assert linear.args[0].op == "placeholder" and linear.args[1].target is torch.ops.aten.t.default  # N-d input, W.t()
    assert ops.count(torch.ops.aten.addmm.default) == 1  # the one with beta=0.5 is left alone
    assert torch.ops.aten.view.default not in {u.target for u in linear.users}
    _assert_same_values_and_input_grads(ep, model, x)


class MatmulLinears(nn.Module):
    """Falcon's `FalconLinear` (`x @ W.T + b`), a weight stored `[in, out]` (`x @ W`), and a
    product of two activations, which is no linear."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 8))
        self.b = nn.Parameter(torch.randn(6))
        self.w_in_out = nn.Parameter(torch.randn(6, 4))

    def forward(self, x):
        h = x @ self.w.T + self.b
        return (h @ self.w_in_out) @ h.transpose(-1, -2)[..., :4, :]


def test_matmul_of_a_weight_becomes_a_linear_with_its_bias_and_products_of_activations_stay():
    x = torch.randn(2, 3, 8)
    model = MatmulLinears()
    ep = _exported(model, (x,))
    assert simplify.matmul_as_linear(ep.graph_module)
    ep.graph_module.graph.eliminate_dead_code()
    ep.graph_module.recompile()
    nodes = [n for n in ep.graph_module.graph.nodes if n.op == "call_function"]
    linears = [n for n in nodes if n.target is torch.ops.aten.linear.default]
    assert [len(n.args) for n in linears] == [3, 2]  # the bias folded into the first
    assert linears[0].args[1].op == "placeholder" and linears[1].args[1].target is torch.ops.aten.t.default
    assert [n.target for n in nodes].count(torch.ops.aten.matmul.default) == 1
    assert torch.ops.aten.add.Tensor not in {n.target for n in nodes}
    _assert_same_values_and_input_grads(ep, model, x)


class ViewedGateUp(nn.Module):
    """Moshi's gating MLP: `fc1(x).view(b, s, 2, -1)`, gate `[..., 0, :]` and up `[..., 1, :]`."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(6, 8)

    def forward(self, x):
        h = self.fc1(x).view(x.shape[0], x.shape[1], 2, -1)
        return self.fc2(torch.nn.functional.silu(h[..., 0, :]) * h[..., 1, :])


def test_view_read_part_by_part_becomes_a_chunk_with_equal_values_and_gradients():
    gm = _rewritten(ViewedGateUp(), simplify.view_parts_as_chunk)
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.chunk.default in ops and torch.ops.aten.select.int not in ops


class SlicedQKV(nn.Module):
    """Phi-3's attention input: `qkv_proj(x)` sliced into q | k | v of 8 | 4 | 4 features (and,
    with `overlap`, a fourth slice reading features twice, which is no cut into parts)."""

    def __init__(self, overlap: bool = False):
        super().__init__()
        self.qkv_proj, self.overlap = nn.Linear(8, 16), overlap

    def forward(self, x):
        qkv = self.qkv_proj(x)
        q, k, v = qkv[..., :8], qkv[..., 8:12], qkv[..., 12:]
        out = q * torch.cat([k, v], -1)
        return out + qkv[..., 4:12] if self.overlap else out


def test_slices_tiling_a_linear_output_become_split_with_sizes_with_equal_values_and_gradients():
    gm = _rewritten(SlicedQKV(), simplify.slices_as_split)
    splits = [n for n in gm.graph.nodes if n.target is torch.ops.aten.split_with_sizes.default]
    assert [s.args[1:] for s in splits] == [([8, 4, 4], 2)]
    assert not any(n.target is torch.ops.aten.slice.Tensor for n in gm.graph.nodes)
    overlapping = _exported(SlicedQKV(overlap=True), (torch.randn(2, 3, 8),))
    assert not simplify.slices_as_split(overlapping.graph_module)


class UnsqueezedMQA(nn.Module):
    """GPT-BigCode's multi-query input: `c_attn(x).unsqueeze(1).split((8, 4, 4), dim=3)`."""

    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(8, 16)

    def forward(self, x):
        q, k, v = self.c_attn(x).unsqueeze(1).split((8, 4, 4), dim=3)
        return q * torch.cat([k, v], -1)


def test_parts_of_an_unsqueezed_projection_are_cut_before_the_unsqueeze_with_equal_values_and_gradients():
    gm = _rewritten(UnsqueezedMQA(), simplify.parts_before_unsqueeze)
    cut = [n for n in gm.graph.nodes if n.target is torch.ops.aten.split_with_sizes.default]
    assert len(cut) == 1 and cut[0].args[0].target is torch.ops.aten.linear.default and cut[0].args[2] == 2


class PickedHeadsMQA(nn.Module):
    """Falcon's multi-query attention input: `qkv(x).view(b, s, heads + 2, d)`, the query heads
    sliced and the one K and V head picked by a constant index."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        b, s, _ = x.shape
        fused = self.qkv(x).view(b, s, 6, 4)
        q, k, v = fused[..., :-2, :], fused[..., [-2], :], fused[..., [-1], :]
        return (q * k + v).flatten(2)


def test_heads_picked_by_a_constant_index_become_split_with_sizes_with_equal_values_and_gradients():
    model, x = PickedHeadsMQA(), torch.randn(2, 3, 8)
    ep = _exported(model, (x,))
    constants = {ph: ep.constants[fqn] for ph, fqn in ep.graph_signature.inputs_to_lifted_tensor_constants.items()}
    assert simplify.heads_picked_as_split(ep.graph_module, constants)
    ep.graph_module.graph.eliminate_dead_code()
    ep.graph_module.recompile()
    cut = [n for n in ep.graph_module.graph.nodes if n.target is torch.ops.aten.split_with_sizes.default]
    assert [c.args[1:] for c in cut] == [([16, 4, 4], 2)]
    _assert_same_values_and_input_grads(ep, model, x)


class ChannelsFirstParts(nn.Module):
    """LFM2's short conv input: `in_proj(x).transpose(-1, -2).chunk(3, dim=-2)`."""

    def __init__(self):
        super().__init__()
        self.in_proj = nn.Linear(8, 12)

    def forward(self, x):
        b, c, h = self.in_proj(x).transpose(-1, -2).chunk(3, dim=-2)
        return (b * h).transpose(-1, -2) + c.sum()


def test_chunk_of_a_transpose_is_cut_before_it_with_equal_values_and_gradients():
    gm = _rewritten(ChannelsFirstParts(), simplify.chunk_before_transpose)
    chunk = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.chunk.default)
    assert chunk.args[0].target is torch.ops.aten.linear.default and chunk.args[2] == 2  # the features' dim


class ChannelsFirstOut(nn.Module):
    """A channels-first value transposed back into a linear, through a `.to()` that changes nothing."""

    def __init__(self):
        super().__init__()
        self.out = nn.Linear(6, 4)

    def forward(self, x):  # x: [b, channels, seq]
        y = x.transpose(1, 2).to(x.device)
        return self.out(y)


def test_non_contiguous_linear_input_is_copied_and_no_op_casts_go():
    x = torch.randn(2, 6, 5)
    model = ChannelsFirstOut()
    ep = _exported(model, (x,))
    assert simplify.same_value_casts_dropped(ep.graph_module)
    assert simplify.contiguous_linear_inputs(ep.graph_module)
    ep.graph_module.recompile()
    nodes = [n for n in ep.graph_module.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.to.device not in {n.target for n in nodes}
    linear = next(n for n in nodes if n.target is torch.ops.aten.linear.default)
    assert linear.args[0].target is torch.ops.aten.clone.default and linear.args[0].meta["val"].is_contiguous()
    _assert_same_values_and_input_grads(ep, model, x)


class ChunkTriangles(nn.Module):
    """The gated delta rule's per-head chunk attention: `tril`/`triu` of `[b, h, c, c]` scores."""

    def forward(self, x):
        s = x.transpose(-1, -2) @ x
        return s.tril(-1) * 2 + s.triu(1) + s.tril()


def test_triangles_of_a_batch_of_matrices_become_masked_fills_with_equal_values_and_gradients():
    gm = _rewritten(ChunkTriangles(), simplify.batched_triangles_as_masks)
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.aten.masked_fill.Scalar) == 3
    # only the 2-D masks are triangles now
    assert all(n.meta["val"].ndim == 2 for n in gm.graph.nodes if n.target in (torch.ops.aten.tril.default, torch.ops.aten.triu.default))
