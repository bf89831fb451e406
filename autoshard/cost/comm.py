"""α-β time of one collective, in NCCL's bus-bandwidth convention.

nccl-tests (doc/PERFORMANCE.md) defines, for a collective over n ranks on a logical tensor of
S bytes taking time t: algbw = S / t and busbw = algbw * factor(kind, n). busbw is the rate on
the busiest link of a ring, hence independent of n, so one measured number per link prices
every kind and group size: t = alpha + factor * S / busbw.
"""

from __future__ import annotations

from .hardware import KINDS, HardwareProfile, LinkProfile


def bus_factor(kind: str, n: int) -> float:
    """busbw / algbw for `kind` over `n` ranks (nccl-tests PERFORMANCE.md).

    all_reduce moves each byte twice around the ring (reduce-scatter then all-gather):
    2(n-1)/n. all_gather / reduce_scatter, with S the *full* gathered (resp. unscattered) size,
    and all_to_all: (n-1)/n. broadcast: 1 (pipelined along the ring).
    """
    if n < 1:
        raise ValueError(f"group size must be >= 1, got {n}")
    if kind == "all_reduce":
        return 2.0 * (n - 1) / n
    if kind in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    if kind == "broadcast":
        return 1.0
    raise ValueError(f"unknown collective kind {kind!r}; known: {', '.join(KINDS)}")


def collective_time(kind: str, nbytes: int, n: int, link: LinkProfile) -> float:
    """Seconds for one `kind` collective on a logical tensor of `nbytes` over `n` ranks.

    `nbytes` is the full logical size S (for all_gather the gathered output, for reduce_scatter
    the input before scattering). A group of one, or an empty tensor, issues no communication.
    """
    factor = bus_factor(kind, n)  # validates kind and n first
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    if n == 1 or nbytes == 0:
        return 0.0
    alpha, busbw = link.params(kind)
    return alpha + factor * nbytes / busbw


def link_for(profile: HardwareProfile, group_spans_nodes: bool) -> LinkProfile:
    """The link a group's ring is bottlenecked by: inter-node as soon as it leaves a node."""
    return profile.inter_node if group_spans_nodes else profile.intra_node
