"""Hardware profiles: the constants the cost model prices compute and collectives with.

A profile is plain data (frozen dataclasses, JSON round trip, no pickle) so a user can write one
for their cluster, or let `autoshard calibrate` measure one, and pass its path to the planner.
Built-in numbers are vendor datasheet peaks and published NCCL measurements; each carries its
source. They are estimates for ranking plans, not promises of step time.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Union

# Collective kinds the comm model knows (see comm.py for their bus factors).
KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast")

_FORMAT = "autoshard.hardware_profile/1"  # bump if the JSON layout changes
GiB = 1 << 30


@dataclass(frozen=True)
class LinkProfile:
    """α-β model of one class of link: `t = alpha + factor(kind, n) * S / busbw`.

    `busbw` is NCCL's *bus* bandwidth (nccl-tests PERFORMANCE.md), so one number serves every
    collective kind and group size. `per_kind` maps a kind to its own (alpha_s, busbw) pair;
    calibrated profiles fill it because real libraries (gloo especially) are not equally
    efficient at every collective.
    """

    name: str
    alpha_s: float
    busbw_bytes_per_s: float
    # hash=False: a dict is unhashable, and equal profiles still hash equal without it.
    per_kind: dict[str, tuple[float, float]] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.alpha_s < 0 or self.busbw_bytes_per_s <= 0:
            raise ValueError(f"link {self.name!r}: need alpha_s >= 0 and busbw > 0")
        for kind, (alpha, bw) in self.per_kind.items():
            if kind not in KINDS:
                raise ValueError(f"link {self.name!r}: unknown collective kind {kind!r}; known: {KINDS}")
            if alpha < 0 or bw <= 0:
                raise ValueError(f"link {self.name!r}, {kind}: need alpha >= 0 and busbw > 0")

    def params(self, kind: str) -> tuple[float, float]:
        """(alpha_s, busbw) for `kind`: the per-kind override if present, else the link default."""
        return self.per_kind.get(kind, (self.alpha_s, self.busbw_bytes_per_s))


@dataclass(frozen=True)
class HardwareProfile:
    """One accelerator (or CPU rank) and the links between them."""

    name: str
    device_memory_bytes: int
    peak_flops: dict[str, float] = field(hash=False)  # dtype name -> FLOP/s (dense)
    mem_bw_bytes_per_s: float
    # Fraction of peak a real kernel reaches; roofline divides both peaks by it.
    efficiency: float
    launch_overhead_s: float  # floor on any kernel's time
    intra_node: LinkProfile
    inter_node: LinkProfile
    devices_per_node: int
    notes: str = ""
    # Host time of one eager DTensor op beyond its kernel (sharding propagation, wrapping): what
    # bounds small models in eager mode. Measured by `autoshard calibrate`; 0 = not modelled (the
    # built-in GPU profiles, whose datasheets say nothing about the host).
    dispatch_overhead_s: float = 0.0
    # The same for that op's backward (autograd engine + the DTensor ops of its gradients), which
    # costs several times the forward; None (profiles written before it was measured): as forward.
    dispatch_backward_s: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"profile {self.name!r}: efficiency must be in (0, 1]")
        if not self.peak_flops or any(v <= 0 for v in self.peak_flops.values()):
            raise ValueError(f"profile {self.name!r}: peak_flops needs positive entries")
        if self.mem_bw_bytes_per_s <= 0 or self.devices_per_node < 1 or self.launch_overhead_s < 0:
            raise ValueError(f"profile {self.name!r}: mem_bw > 0, devices_per_node >= 1, launch >= 0")

    @property
    def device_type(self) -> str:
        """Whose kernels the profile prices: "cpu" profiles (cpu-gloo, calibrated ones) or GPUs."""
        return "cpu" if self.name.startswith("cpu") else "cuda"

    # -- JSON -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = _FORMAT
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HardwareProfile":
        d = dict(d)
        fmt = d.pop("format", _FORMAT)
        if fmt != _FORMAT:
            raise ValueError(f"unsupported hardware profile format {fmt!r} (expected {_FORMAT!r})")
        d.pop("measurements", None)  # raw data calibrate stores alongside, for people to read
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:  # a typo in a hand-written profile should not silently fall back to nothing
            raise ValueError(f"unknown hardware profile keys {sorted(unknown)}")

        def link(ld: dict[str, Any]) -> LinkProfile:
            # JSON turns tuples into lists; restore them so equality with the original holds.
            per_kind = {k: (float(a), float(b)) for k, (a, b) in ld.get("per_kind", {}).items()}
            return LinkProfile(ld["name"], float(ld["alpha_s"]), float(ld["busbw_bytes_per_s"]), per_kind)

        return cls(
            name=d["name"],
            device_memory_bytes=int(d["device_memory_bytes"]),
            peak_flops={k: float(v) for k, v in d["peak_flops"].items()},
            mem_bw_bytes_per_s=float(d["mem_bw_bytes_per_s"]),
            efficiency=float(d["efficiency"]),
            launch_overhead_s=float(d["launch_overhead_s"]),
            intra_node=link(d["intra_node"]),
            inter_node=link(d["inter_node"]),
            devices_per_node=int(d["devices_per_node"]),
            notes=d.get("notes", ""),
            dispatch_overhead_s=float(d.get("dispatch_overhead_s", 0.0)),
            dispatch_backward_s=None if d.get("dispatch_backward_s") is None else float(d["dispatch_backward_s"]),
        )

    @classmethod
    def from_json(cls, text: str) -> "HardwareProfile":
        return cls.from_dict(json.loads(text))

    def save(self, path: Union[str, os.PathLike]) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "HardwareProfile":
        return cls.from_json(Path(path).read_text())


# -- built-in profiles -------------------------------------------------------------------------
# Efficiency 0.7 and a 7 µs launch floor follow meta-pytorch/autoparallel's compute model
# (its compute-estimation module). Latencies: NCCL's tuning model (src/graph/tuning.cc) charges a ring a base of
# 6.6-8.4 µs plus 0.6-3.4 µs per NVLink step (1.0-5.7 µs per PCIe step), i.e. tens of µs for an
# 8-rank ring; autoparallel's H100 tables measure ~30 µs.

H100_SXM = HardwareProfile(
    name="h100-sxm",
    device_memory_bytes=80 * GiB,  # H100 SXM5 80 GB HBM3 (NVIDIA datasheet)
    peak_flops={
        # NVIDIA H100 SXM datasheet, dense (the sparsity figures are 2x these).
        "bfloat16": 989e12,
        "float16": 989e12,
        "float32": 67e12,  # non-tensor-core FP32; PyTorch disables TF32 matmul by default
        "tfloat32": 494.7e12,
        "float8_e4m3fn": 1979e12,
        "float64": 67e12,  # FP64 tensor core
    },
    mem_bw_bytes_per_s=3.35e12,  # HBM3, NVIDIA datasheet
    efficiency=0.7,
    launch_overhead_s=7e-6,
    # NVLink4 line rate is 450 GB/s per direction; NCCL's effective ring busbw is ~370 GB/s
    # (sjeaugey, NVIDIA/nccl-tests#212). NVLS all-reduce reaches ~480 GB/s busbw but we keep
    # the ring figure: it is what AG/RS get, and conservative for all-reduce. ~30 µs latency:
    # autoparallel nccl_cost_model.py H100 tables.
    intra_node=LinkProfile("nvlink4", alpha_s=30e-6, busbw_bytes_per_s=370e9),
    # DGX H100: one 400 Gb/s NDR IB NIC per GPU = 50 GB/s per direction (DGX H100 reference
    # architecture). Latency: our estimate from NCCL tuning.cc net hop latencies.
    inter_node=LinkProfile("ib-ndr-400", alpha_s=50e-6, busbw_bytes_per_s=50e9),
    devices_per_node=8,
    notes="8x H100 SXM5 (HGX/DGX) nodes, NVLink4 + NVSwitch inside, NDR InfiniBand between.",
)

A100_SXM = HardwareProfile(
    name="a100-sxm",
    device_memory_bytes=80 * GiB,  # A100 SXM4 80 GB HBM2e (NVIDIA datasheet)
    peak_flops={
        # NVIDIA A100 datasheet, dense.
        "bfloat16": 312e12,
        "float16": 312e12,
        "float32": 19.5e12,
        "tfloat32": 156e12,
        "float64": 19.5e12,  # FP64 tensor core
    },
    mem_bw_bytes_per_s=2.039e12,  # A100 80GB SXM HBM2e, NVIDIA datasheet
    efficiency=0.7,
    launch_overhead_s=7e-6,
    # NVLink3 line rate 300 GB/s per direction; nccl-tests on 8x A100-SXM4-80GB report ~200 GB/s
    # busbw (NVIDIA/nccl-tests#149; 208 GB/s in #178). ~20 µs: NCCL tuning.cc ring LL over
    # NVLink, 6.6 + 14 x 0.6 µs for 8 ranks.
    intra_node=LinkProfile("nvlink3", alpha_s=20e-6, busbw_bytes_per_s=200e9),
    # DGX A100: one 200 Gb/s HDR IB NIC per GPU = 25 GB/s per direction (DGX A100 user guide).
    inter_node=LinkProfile("ib-hdr-200", alpha_s=50e-6, busbw_bytes_per_s=25e9),
    devices_per_node=8,
    notes="8x A100 SXM4 80GB (HGX/DGX) nodes, NVLink3 + NVSwitch inside, HDR InfiniBand between.",
)

PCIE_GPU = HardwareProfile(
    name="pcie-gpu",
    device_memory_bytes=48 * GiB,  # NVIDIA L40S: 48 GB GDDR6 (datasheet)
    peak_flops={
        # NVIDIA L40S datasheet, dense (sparsity figures are 2x).
        "bfloat16": 362e12,
        "float16": 362e12,
        "float32": 91.6e12,
        "tfloat32": 183e12,
    },
    mem_bw_bytes_per_s=864e9,  # L40S GDDR6, datasheet
    efficiency=0.7,
    launch_overhead_s=7e-6,
    # No NVLink: PCIe Gen4 x16 is ~32 GB/s per direction, and NCCL over PCIe is bounded by the
    # CPU root complex / memory (sjeaugey in NVIDIA/nccl#1639: 8x PCIe Gen5 GPUs reached 28 GB/s
    # busbw). 20 GB/s is our estimate for Gen4. ~30 µs: NCCL tuning.cc ring over PCI,
    # 6.6 + 14 x 1.0 µs (LL) and more for larger protocols.
    intra_node=LinkProfile("pcie4", alpha_s=30e-6, busbw_bytes_per_s=20e9),
    # Assumption: one 100 Gb/s NIC per GPU (12.5 GB/s) on a typical PCIe inference/training box.
    inter_node=LinkProfile("eth-100g", alpha_s=60e-6, busbw_bytes_per_s=12.5e9),
    devices_per_node=8,
    notes="8x L40S-class PCIe GPUs per node, no NVLink; numbers are estimates, calibrate if possible.",
)

CPU_GLOO = HardwareProfile(
    name="cpu-gloo",
    device_memory_bytes=16 * GiB,  # rough: a rank's share of a small box's RAM
    # Rough per-rank figures for one modern x86 core (AVX2 FMA, ~2-3 GHz): ~30-50 GFLOP/s fp32.
    # bf16/fp16 matmul on CPUs without AMX is usually no faster than fp32. `calibrate` measures.
    peak_flops={"float32": 40e9, "bfloat16": 20e9, "float16": 10e9, "float64": 20e9},
    mem_bw_bytes_per_s=10e9,  # rough single-core DRAM stream bandwidth
    efficiency=1.0,  # the rough peaks above are already achieved rates
    launch_overhead_s=5e-6,  # eager op dispatch on CPU is a few µs
    # gloo over loopback TCP: ~hundreds of µs per call, ~1 GB/s (rough; see calibrate.py).
    intra_node=LinkProfile("gloo-loopback", alpha_s=200e-6, busbw_bytes_per_s=1e9),
    inter_node=LinkProfile("gloo-tcp", alpha_s=500e-6, busbw_bytes_per_s=1e9),
    devices_per_node=64,
    notes="Uncalibrated defaults for CPU ranks over gloo; run `autoshard calibrate` to measure.",
)

BUILTIN_PROFILES: dict[str, HardwareProfile] = {p.name: p for p in (H100_SXM, A100_SXM, PCIE_GPU, CPU_GLOO)}
ALIASES = {"h100": "h100-sxm", "a100": "a100-sxm", "l40s": "pcie-gpu", "cpu": "cpu-gloo"}

ProfileLike = Union[str, os.PathLike, HardwareProfile]


def get_profile(spec: ProfileLike) -> HardwareProfile:
    """A built-in name or alias, a path to a JSON profile (as written by calibrate), or a profile."""
    if isinstance(spec, HardwareProfile):
        return spec
    if isinstance(spec, os.PathLike):
        return HardwareProfile.load(spec)
    if not isinstance(spec, str):
        raise TypeError(f"expected a profile name, path or HardwareProfile, got {type(spec).__name__}")
    key = spec.strip().lower()
    key = ALIASES.get(key, key)
    if key in BUILTIN_PROFILES:
        return BUILTIN_PROFILES[key]
    if spec.endswith(".json") or os.path.isfile(spec):
        if not os.path.isfile(spec):
            raise ValueError(f"hardware profile file {spec!r} does not exist")
        return HardwareProfile.load(spec)
    known = sorted(BUILTIN_PROFILES) + sorted(f"{a} (= {t})" for a, t in ALIASES.items())
    raise ValueError(
        f"unknown hardware profile {spec!r}; known: {', '.join(known)}; "
        "or pass a path to a JSON profile (e.g. one written by `autoshard calibrate`)"
    )
