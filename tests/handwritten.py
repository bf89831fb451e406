"""A hand-written Llama-style decoder with arbitrary names and its own attention code.

Nothing here matches transformers' module or parameter names: autoshard must find the same
column->row structure from dataflow alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Scale(nn.Module):
    """RMSNorm written out by hand."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.gain


class Mixer(nn.Module):
    """Causal self-attention with its own score/softmax code (no SDPA) and constant head counts."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.alpha = nn.Linear(d, d, bias=False)
        self.beta = nn.Linear(d, d, bias=False)
        self.gamma = nn.Linear(d, d, bias=False)
        self.omega = nn.Linear(d, d, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.alpha(x).view(b, s, self.heads, self.hd).transpose(1, 2)
        k = self.beta(x).view(b, s, self.heads, self.hd).transpose(1, 2)
        v = self.gamma(x).view(b, s, self.heads, self.hd).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.hd)
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        y = scores.softmax(-1) @ v
        return self.omega(y.transpose(1, 2).reshape(b, s, self.heads * self.hd))


class Feed(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.left, self.right, self.back = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False), nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.back(F.silu(self.left(x)) * self.right(x))


class Block(nn.Module):
    def __init__(self, d, heads, f):
        super().__init__()
        self.pre, self.mix, self.post, self.feed = Scale(d), Mixer(d, heads), Scale(d), Feed(d, f)

    def forward(self, x):
        x = x + self.mix(self.pre(x))
        return x + self.feed(self.post(x))


class TinyLM(nn.Module):
    def __init__(self, vocab=96, d=32, heads=4, f=80, depth=2):
        super().__init__()
        self.table = nn.Embedding(vocab, d)
        self.stack = nn.ModuleList(Block(d, heads, f) for _ in range(depth))
        self.final = Scale(d)
        self.readout = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        x = self.table(tokens)
        for blk in self.stack:
            x = blk(x)
        return self.readout(self.final(x))
