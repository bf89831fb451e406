"""Roofline time of a kernel, and FLOP counting on meta/fake tensors."""

from __future__ import annotations

from typing import Any, Callable, Union

import torch
from torch.utils.flop_counter import FlopCounterMode

from .hardware import HardwareProfile, ProfileLike, get_profile

_DTYPE_ALIASES = {
    "fp32": "float32", "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16", "half": "float16",
    "tf32": "tfloat32",
    "fp64": "float64", "double": "float64",
    "fp8": "float8_e4m3fn",
}


def dtype_name(dtype: Union[torch.dtype, str]) -> str:
    """Canonical key into `HardwareProfile.peak_flops` ("torch.bfloat16", "bf16" -> "bfloat16")."""
    name = str(dtype).removeprefix("torch.").lower()
    return _DTYPE_ALIASES.get(name, name)


def peak_flops_for(profile: HardwareProfile, dtype: Union[torch.dtype, str]) -> float:
    """Peak FLOP/s for `dtype`; dtypes the profile does not list (ints, bool, exotic floats)
    fall back to float32, since their kernels are elementwise/memory bound anyway."""
    name = dtype_name(dtype)
    if name in profile.peak_flops:
        return profile.peak_flops[name]
    if "float32" in profile.peak_flops:
        return profile.peak_flops["float32"]
    raise ValueError(f"profile {profile.name!r} has no peak for {name!r} nor float32; has {sorted(profile.peak_flops)}")


def compute_time(
    flops: float, bytes_moved: float, profile: ProfileLike, dtype: Union[torch.dtype, str] = "float32"
) -> float:
    """Roofline: max(compute time, memory time, launch floor), both peaks derated by efficiency.

    A kernel with no work at all costs nothing (it is not launched); any work pays at least the
    launch overhead, which dominates the tiny elementwise ops of small models.
    """
    if flops < 0 or bytes_moved < 0:
        raise ValueError("flops and bytes_moved must be >= 0")
    if flops == 0 and bytes_moved == 0:
        return 0.0
    p = get_profile(profile)
    t_compute = flops / (peak_flops_for(p, dtype) * p.efficiency)
    t_memory = bytes_moved / (p.mem_bw_bytes_per_s * p.efficiency)
    return max(t_compute, t_memory, p.launch_overhead_s)


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """FLOPs of `fn(*args, **kwargs)` as counted by FlopCounterMode (matmul/conv/attention only;
    elementwise ops count 0). Works on meta and fake tensors, so nothing real is allocated."""
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())
