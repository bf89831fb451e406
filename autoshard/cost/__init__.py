"""Cost models: hardware profiles, α-β collective times, roofline compute, calibration."""

from .comm import bus_factor, collective_time, link_for
from .compute import compute_time, count_flops, dtype_name, peak_flops_for
from .hardware import (
    ALIASES,
    BUILTIN_PROFILES,
    KINDS,
    HardwareProfile,
    LinkProfile,
    get_profile,
)

# calibrate is imported lazily by `autoshard calibrate`; it spawns processes and is not needed
# for planning. `from autoshard.cli.calibrate import calibrate` when you want it.

__all__ = [
    "ALIASES",
    "BUILTIN_PROFILES",
    "KINDS",
    "HardwareProfile",
    "LinkProfile",
    "bus_factor",
    "collective_time",
    "compute_time",
    "count_flops",
    "dtype_name",
    "get_profile",
    "link_for",
    "peak_flops_for",
]
