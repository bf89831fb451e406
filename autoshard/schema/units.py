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
