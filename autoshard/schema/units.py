"""Units shared by the plan's views and the planner's messages."""

from __future__ import annotations

import math


def format_bytes(n: float, digits: int = 1) -> str:
    """`1536` -> "1.5 KiB"; whole bytes without decimals; infinity as "unlimited" (no budget)."""
    if n == math.inf:
        return "unlimited"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1024
    return str(n)


# ---- torch.chunk's layout (DTensor's Shard): full blocks of ceil(n / parts), a short one, then empty ----
def chunk_block(n, parts: int):
    """The size of every full chunk of an `n`-long dim split in `parts` (ints or SymInts)."""
    return (n + parts - 1) // parts


def chunk_start(n, parts: int, index: int):
    """Where chunk `index` starts (`n` for the empty chunks past the end)."""
    return min(index * chunk_block(n, parts), n)


def chunk_len(n, parts: int, index: int):
    """How many of the `n` elements chunk `index` holds."""
    block = chunk_block(n, parts)
    return max(0, min(block, n - index * block))


def split_len(n, ranks: int, index: int, parts: int | tuple[int, ...] = 1):
    """How many of `n` elements rank `index` holds when each of `parts` equal parts (a fused
    weight's gate | up, DTensor's `_StridedShard(sf=parts)`), or each part of the given widths
    (`StridedParts`), is split like torch.chunk."""
    if isinstance(parts, tuple):
        return sum(chunk_len(w, ranks, index) for w in parts)
    return parts * chunk_len(n // parts, ranks, index)


def pack_buckets(sized, cap: float) -> list[list]:
    """`(key, nbytes)` pairs, in order, packed into consecutive buckets of at most `cap` bytes (a
    larger item gets a bucket of its own): DDP's and autoshard's gradient buckets."""
    buckets: list[list] = []
    size = 0.0
    for key, nbytes in sized:
        if not buckets or (buckets[-1] and size + nbytes > cap):
            buckets.append([])
            size = 0.0
        buckets[-1].append(key)
        size += nbytes
    return buckets
