"""`graph/einsum_forms`: Mamba-2's two-operand einsums become permutes and one batched matmul
with the same values and gradients; equations that sum inside one operand stay einsums."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoshard.graph.einsum_forms import einsum_as_matmul

aten = torch.ops.aten

SHAPES = {"b": 2, "c": 3, "l": 4, "s": 4, "h": 5, "n": 6, "p": 7, "z": 3, "i": 3, "j": 4, "k": 5, "q": 2, "d": 3}
MAMBA2 = ["bclhn,bcshn->bclsh", "bclsh,bcshp->bclhp", "bclhn,bclhp->bchpn", "bzch,bzhpn->bchpn", "bclhn,bchpn->bclhp"]


class Einsum(nn.Module):
    def __init__(self, eq: str):
        super().__init__()
        self.eq = eq

    def forward(self, x, y):
        return torch.einsum(self.eq, x, y)


def _operands(eq):
    a, b = eq.split("->")[0].split(",")
    return torch.randn([SHAPES[c] for c in a]), torch.randn([SHAPES[c] for c in b])


@pytest.mark.parametrize("eq", MAMBA2 + ["ij,jk->ik", "bhqd,bhkd->bhqk", "i,j->ij", "bi,bi->b"])
def test_einsum_becomes_a_batched_matmul_with_equal_values_and_gradients(eq):
    torch.manual_seed(0)
    x, y = _operands(eq)
    ep = torch.export.export(Einsum(eq), (x, y), strict=False)
    assert einsum_as_matmul(ep.graph_module)
    ep.graph_module.graph.lint()
    ep.graph_module.recompile()
    ops = [n.target for n in ep.graph_module.graph.nodes if n.op == "call_function"]
    assert aten.einsum.default not in ops and ops.count(aten.matmul.default) == 1
    xa, ya, xb, yb = (t.clone().requires_grad_() for t in (x, y, x, y))
    out, expect = ep.module()(xa, ya), torch.einsum(eq, xb, yb)
    torch.testing.assert_close(out, expect)
    w = torch.randn_like(expect)
    (out * w).sum().backward()
    (expect * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ya.grad, yb.grad)


def test_a_letter_summed_inside_one_operand_stays_an_einsum():
    eq = "bcl,bcs->bs"
    ep = torch.export.export(Einsum(eq), _operands(eq), strict=False)
    assert not einsum_as_matmul(ep.graph_module)
