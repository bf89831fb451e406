"""The transformer of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", arXiv:2205.05198), built to the paper's assumptions so the activation-memory
model can be checked against its formulas: pre-LayerNorm blocks, a 4h GELU MLP, dropout after the
attention softmax and after both blocks, and materialised attention scores (no fused attention),
16-bit activations with 1-byte dropout masks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PaperAttention(nn.Module):
    def __init__(self, h: int, a: int, p: float):
        super().__init__()
        self.a, self.d, self.p = a, h // a, p
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)
        self.dense = nn.Linear(h, h)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.query(x).view(b, s, self.a, self.d).transpose(1, 2)
        k = self.key(x).view(b, s, self.a, self.d).transpose(1, 2)
        v = self.value(x).view(b, s, self.a, self.d).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.d)
        probs = F.dropout(torch.softmax(scores, dim=-1), self.p, self.training)
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, -1)
        return F.dropout(self.dense(ctx), self.p, self.training)


class PaperMLP(nn.Module):
    def __init__(self, h: int, p: float):
        super().__init__()
        self.fc_in, self.fc_out, self.p = nn.Linear(h, 4 * h), nn.Linear(4 * h, h), p

    def forward(self, x):
        return F.dropout(self.fc_out(F.gelu(self.fc_in(x))), self.p, self.training)


class PaperBlock(nn.Module):
    def __init__(self, h: int, a: int, p: float):
        super().__init__()
        self.ln_attn, self.attn = nn.LayerNorm(h), PaperAttention(h, a, p)
        self.ln_mlp, self.mlp = nn.LayerNorm(h), PaperMLP(h, p)

    def forward(self, x):
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class PaperGPT(nn.Module):
    """Token ids in, hidden states out (no LM head): per-layer activations are what is measured,
    as the difference between models of L and L+1 layers."""

    def __init__(self, h: int = 64, a: int = 4, layers: int = 1, p: float = 0.1, vocab: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab, h)
        self.blocks = nn.ModuleList(PaperBlock(h, a, p) for _ in range(layers))

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return x


def paper_bytes_per_layer(s: int, b: int, h: int, a: int, t: int, setting: str) -> float:
    """The paper's Table 2: activation bytes per transformer layer."""
    if setting == "none":
        return s * b * h * (34 + 5 * a * s / h)
    if setting == "tp":
        return s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
    if setting == "tp_sp":
        return s * b * h / t * (34 + 5 * a * s / h)
    raise ValueError(setting)
