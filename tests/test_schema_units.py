"""One place for torch.chunk's layout and for gradient bucket packing."""

from __future__ import annotations

import pytest
import torch

from autoshard.schema.units import chunk_block, chunk_len, chunk_start, format_bytes, pack_buckets


@pytest.mark.parametrize("n", range(0, 13))
@pytest.mark.parametrize("parts", range(1, 6))
def test_chunk_layout_is_torch_chunks(n, parts):
    chunks = torch.chunk(torch.arange(n), parts) if n else ()
    for i in range(parts):
        want = chunks[i].tolist() if i < len(chunks) else []
        start, length = chunk_start(n, parts, i), chunk_len(n, parts, i)
        assert list(range(start, start + length)) == want
    assert chunk_block(n, parts) == (len(chunks[0]) if chunks else 0)


def test_buckets_pack_in_order_and_a_large_item_gets_its_own():
    sized = [("a", 10), ("b", 10), ("c", 25), ("d", 5), ("e", 15)]
    assert pack_buckets(sized, 20) == [["a", "b"], ["c"], ["d", "e"]]
    assert pack_buckets([], 20) == []


def test_format_bytes():
    assert (format_bytes(1536), format_bytes(100), format_bytes(float("inf"))) == ("1.5 KiB", "100 B", "unlimited")
