"""Devices the performance model can plan for: a table of GPUs and the local CPU.

GPU figures are NVIDIA's published peaks for *dense* math (the datasheets quote
tensor-core rates "with sparsity"; those are halved here). Memory sizes are the
marketed capacity taken as GiB, which is how the parts are built; the usable
part is a little less (CUDA context, ECC), so a planner keeps headroom.
Bandwidths are decimal (1 GB/s = 1e9 B/s) as in the datasheets. The launch
overhead of a GPU is an assumption (typical CUDA kernel launch latency), not a
datasheet figure. The local CPU is measured by `calibrate`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from bigpicture.errors import TilingError

GiB = 2**30
TFLOPS = 1e12
GB_PER_S = 1e9
GPU_LAUNCH_S = 5e-6  # assumed: CUDA kernel launches typically take 3-10 us, none is on a datasheet

DTYPE_KEYS: Mapping[torch.dtype, str] = MappingProxyType(
    {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}
)


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int
    bandwidth_bytes_per_s: float
    # dtype key ("fp32", "tf32", "fp16", "bf16", "fp64") -> dense flops/s
    peak_flops: Mapping[str, float] = field(hash=False)
    launch_overhead_s: float
    source: str
    cores: int | None = None
    sms: int | None = None  # streaming multiprocessors of a GPU: blocks of a kernel run in waves over them

    def __post_init__(self) -> None:
        # a read-only view, so a Device shared by many plans cannot be edited through one of them
        object.__setattr__(self, "peak_flops", MappingProxyType(dict(self.peak_flops)))

    def peak(self, dtype: torch.dtype | str) -> float:
        """Dense peak flops/s for a torch dtype or a key such as "tf32"."""
        key = DTYPE_KEYS.get(dtype, dtype) if isinstance(dtype, torch.dtype) else dtype
        if key not in self.peak_flops:
            raise TilingError(
                f"device {self.name} has no peak throughput for {dtype}; "
                f"known: {', '.join(self.peak_flops)}. Plan with one of those dtypes."
            )
        return self.peak_flops[key]


def _gpu(
    name: str,
    memory_gib: float,
    bandwidth_gb_s: float,
    fp32: float,
    tf32: float,
    fp16: float,
    bf16: float,
    source: str,
    fp64: float | None = None,
) -> Device:
    """A table entry, in the datasheets' units: GiB, GB/s and dense TFLOPS."""
    flops = {"fp32": fp32, "tf32": tf32, "fp16": fp16, "bf16": bf16}
    if fp64 is not None:
        flops["fp64"] = fp64
    return Device(
        name=name,
        memory_bytes=int(memory_gib * GiB),
        bandwidth_bytes_per_s=bandwidth_gb_s * GB_PER_S,
        peak_flops={k: v * TFLOPS for k, v in flops.items()},
        launch_overhead_s=GPU_LAUNCH_S,
        source=source,
    )


# Volta and Turing have no TF32 or BF16 units: torch runs those as fp32 on the CUDA cores,
# so their fp32 rate is given. GeForce cards are quoted with fp32 accumulation (what torch uses),
# which runs at half their fp16-accumulate rate. fp64 is listed where the datasheet gives it;
# on A100/H100/H200 it is the FP64 Tensor Core rate that cuBLAS DGEMM reaches.
# fmt: off
_TABLE = [
    # name, memory GiB, bandwidth GB/s, then dense TFLOPS: fp32, tf32, fp16, bf16
    _gpu("V100", 32, 900, 15.7, 15.7, 125, 15.7,
         "NVIDIA Tesla V100 GPU Accelerator datasheet (V100 SXM2 32GB)", fp64=7.8),
    _gpu("A100-40GB", 40, 1555, 19.5, 156, 312, 312,
         "NVIDIA A100 Tensor Core GPU datasheet (A100 40GB SXM)", fp64=19.5),
    _gpu("A100-80GB", 80, 2039, 19.5, 156, 312, 312,
         "NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM)", fp64=19.5),
    _gpu("H100-SXM", 80, 3350, 67, 494.5, 989.5, 989.5,
         "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM)", fp64=67),
    _gpu("H100-PCIe", 80, 2000, 51, 378, 756.5, 756.5,
         "NVIDIA H100 Tensor Core GPU datasheet (H100 PCIe)", fp64=51),
    _gpu("H200", 141, 4800, 67, 494.5, 989.5, 989.5,
         "NVIDIA H200 Tensor Core GPU datasheet (H200 SXM)", fp64=67),
    _gpu("L4", 24, 300, 30.3, 60, 121, 121,
         "NVIDIA L4 Tensor Core GPU datasheet"),
    _gpu("L40S", 48, 864, 91.6, 183, 362.05, 362.05,
         "NVIDIA L40S GPU datasheet"),
    _gpu("A10", 24, 600, 31.2, 62.5, 125, 125,
         "NVIDIA A10 Tensor Core GPU datasheet"),
    _gpu("T4", 16, 320, 8.1, 8.1, 65, 8.1,
         "NVIDIA T4 Tensor Core GPU datasheet"),
    _gpu("RTX-3090", 24, 936, 35.6, 35.6, 71, 71,
         "NVIDIA Ampere GA102 GPU Architecture whitepaper (GeForce RTX 3090)"),
    _gpu("RTX-4090", 24, 1008, 82.6, 82.6, 165.2, 165.2,
         "NVIDIA Ada GPU Architecture whitepaper (GeForce RTX 4090)"),
]
# fmt: on
# Streaming multiprocessors: CUDA cores on the datasheets over cores per SM in the architecture
# whitepapers (64 on Volta and Turing, GA100 and GH100; 128 on GA10x and AD10x): V100 5120 / 64,
# A100 6912 / 64, H100 SXM 16896 / 128 (GH100: 128 FP32 cores per SM), H100 PCIe 14592 / 128,
# L4 7424 / 128, L40S 18176 / 128, A10 9216 / 128, T4 2560 / 64, RTX 3090 10496 / 128,
# RTX 4090 16384 / 128
_SMS = {"V100": 80, "A100-40GB": 108, "A100-80GB": 108, "H100-SXM": 132, "H100-PCIe": 114, "H200": 132,
        "L4": 58, "L40S": 142, "A10": 72, "T4": 40, "RTX-3090": 82, "RTX-4090": 128}  # fmt: skip
DEVICES: Mapping[str, Device] = MappingProxyType(
    {d.name: dataclasses.replace(d, sms=_SMS.get(d.name)) for d in _TABLE}
)
# the full product names, for users who copy them from a datasheet or nvidia-smi
_ALIASES = {"V100-SXM2-32GB": "V100", "A100-SXM4-40GB": "A100-40GB", "A100-SXM4-80GB": "A100-80GB",
            "H100-80GB-HBM3": "H100-SXM", "H200-SXM": "H200", "GeForce-RTX-3090": "RTX-3090",
            "GeForce-RTX-4090": "RTX-4090"}  # fmt: skip


def _key(name: str) -> str:
    return "".join(c for c in name.lower() if c not in "-_ ")


def get_device(name: str) -> Device:
    """A device by name, ignoring case, '-', '_' and spaces; "cpu" is the local CPU."""
    key = _key(name)
    if key in ("cpu", "local", "localcpu"):
        return local_cpu()
    by_key = {_key(n): d for n, d in DEVICES.items()} | {_key(a): DEVICES[n] for a, n in _ALIASES.items()}
    if key in by_key:
        return by_key[key]
    # "A100" is ambiguous rather than a typo: offer every table entry it starts
    similar = [k for k in by_key if k.startswith(key)] or difflib.get_close_matches(key, by_key, n=3)
    names = dict.fromkeys(by_key[k].name for k in similar)  # aliases repeat names; keep order
    hint = f" Did you mean {' or '.join(map(repr, names))}?" if names else ""
    raise TilingError(
        f"unknown device {name!r}.{hint} Known devices: {', '.join(DEVICES)}, and 'cpu' "
        "(this machine). For another device, build a bigpicture.perf.devices.Device with its figures."
    )


def for_torch(device: torch.device | str) -> Device:
    """The table entry for a torch device: "cpu" is the local CPU; a CUDA device by its product name.

    A GPU missing from the table gets its memory from the driver and the figures of the table's
    entry closest in memory size, which is a rough guess; build a Device for better predictions.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return local_cpu()
    if device.type != "cuda":
        raise TilingError(f"no performance figures for {device.type} devices; plan for 'cpu' or a CUDA GPU.")
    props = torch.cuda.get_device_properties(device)
    name = props.name.removeprefix("NVIDIA ").replace(" ", "-")
    try:
        return get_device(name)
    except TilingError:
        like = min(DEVICES.values(), key=lambda d: abs(d.memory_bytes - props.total_memory))
        source = f"{props.name}: memory from the driver, rates of {like.name} (not in the table)"
        return dataclasses.replace(
            like, name=name, memory_bytes=props.total_memory, source=source, sms=props.multi_processor_count
        )


def _memory_bytes() -> int:
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    # a container sees the host's memory in /proc; its cgroup limit is what it may use
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
    return total


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")


def machine() -> dict[str, Any]:
    """What a calibration is valid for: a shared home directory must not leak one node's numbers."""
    return {"node": platform.node(), "cpu": _cpu_model(), "cores": _cores(), "torch": torch.__version__}


def local_cpu(path: str | os.PathLike | None = None) -> Device:
    """This machine's CPU: calibrated figures if `calibrate` was run here, else nominal ones."""
    cal = load_calibration(path)
    if cal is not None:
        flops = {DTYPE_KEYS[getattr(torch, dt)]: max(r.values()) for dt, r in cal["matmul"].items()}
        flops["tf32"] = flops["fp32"]  # no TF32 on CPUs
        return Device(
            "cpu",
            _memory_bytes(),
            cal["bandwidth_bytes_per_s"],
            flops,
            cal["launch_overhead_s"],
            f"calibrated {cal['created']}",
            _cores(),
        )
    # 2 FMA units x 8 fp32 lanes (AVX2) x 2 flops at 2.5 GHz: a guess to be replaced by calibrate()
    fp32 = _cores() * 2.5e9 * 32
    return Device(
        "cpu", _memory_bytes(), 20 * GB_PER_S,
        {"fp32": fp32, "tf32": fp32, "fp64": fp32 / 2, "fp16": fp32, "bf16": fp32},
        5e-6, "nominal, uncalibrated: run bigpicture.perf.devices.calibrate()", _cores(),
    )  # fmt: skip


def calibration_path(path: str | os.PathLike | None = None) -> Path:
    """The calibration file: `path`, else $BIGPICTURE_CACHE, else ~/.cache/bigpicture."""
    if path is not None:
        return Path(path)
    cache = os.environ.get("BIGPICTURE_CACHE")
    if cache is None:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bigpicture"
    return Path(cache) / "calibration.json"


def load_calibration(path: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The stored calibration of this machine, or None if absent, unreadable or from another machine."""
    try:
        cal = json.loads(calibration_path(path).read_text())
    except (OSError, ValueError):
        return None
    return cal if cal.get("machine") == machine() else None


@dataclass(frozen=True)
class Interconnect:
    """A link between devices: bandwidth per device and direction, and latency per collective step."""

    name: str
    bandwidth_bytes_per_s: float  # per device, per direction, as the specification gives it
    latency_s: float  # per step of a ring collective: an assumption, no datasheet gives it
    source: str


# fmt: off
_LINKS = [
    # NVLink totals on the datasheets count both directions: halved here.
    Interconnect("NVLink2", 150 * GB_PER_S, 10e-6, "NVIDIA Tesla V100 datasheet: NVLink 300 GB/s"),
    Interconnect("NVLink3", 300 * GB_PER_S, 10e-6, "NVIDIA A100 datasheet: NVLink 600 GB/s"),
    Interconnect("NVLink4", 450 * GB_PER_S, 10e-6, "NVIDIA H100 datasheet: NVLink 900 GB/s"),
    # PCIe x16 per direction: lanes x transfer rate x 128b/130b encoding
    Interconnect("PCIe3", 15.75 * GB_PER_S, 20e-6, "PCI-SIG PCIe 3.0: 8 GT/s x 16 lanes"),
    Interconnect("PCIe4", 31.5 * GB_PER_S, 20e-6, "PCI-SIG PCIe 4.0: 16 GT/s x 16 lanes"),
    Interconnect("PCIe5", 63 * GB_PER_S, 20e-6, "PCI-SIG PCIe 5.0: 32 GT/s x 16 lanes"),
    Interconnect("NVLink-C2C", 450 * GB_PER_S, 10e-6, "NVIDIA GH200 Grace Hopper Superchip datasheet: "
                 "NVLink-C2C 900 GB/s CPU-GPU"),
    # between nodes, one network adapter per GPU (as in NVIDIA DGX A100 / H100)
    Interconnect("IB-HDR", 25 * GB_PER_S, 20e-6, "InfiniBand HDR 200 Gb/s per port (NVIDIA ConnectX-6)"),
    Interconnect("IB-NDR", 50 * GB_PER_S, 20e-6, "InfiniBand NDR 400 Gb/s per port (NVIDIA ConnectX-7)"),
    Interconnect("Ethernet-100G", 12.5 * GB_PER_S, 50e-6, "IEEE 802.3 100 Gb/s Ethernet"),
    Interconnect("loopback", 2 * GB_PER_S, 100e-6, "gloo between processes of one machine: nominal; "
                 "benchmarks/distributed.py measures this machine's"),
]
# fmt: on
INTERCONNECTS: Mapping[str, Interconnect] = MappingProxyType({link.name: link for link in _LINKS})
# within a node: the GPU's own link (SXM parts: NVLink; PCIe cards: their PCIe generation, from the
# same datasheets as the table above); between nodes: InfiniBand of the GPU's generation
NODE_LINKS: Mapping[str, tuple[str, str]] = MappingProxyType({
    "V100": ("NVLink2", "IB-HDR"), "A100-40GB": ("NVLink3", "IB-HDR"), "A100-80GB": ("NVLink3", "IB-HDR"),
    "H100-SXM": ("NVLink4", "IB-NDR"), "H200": ("NVLink4", "IB-NDR"), "H100-PCIe": ("PCIe5", "IB-NDR"),
    "L4": ("PCIe4", "Ethernet-100G"), "L40S": ("PCIe4", "IB-NDR"), "A10": ("PCIe4", "Ethernet-100G"),
    "T4": ("PCIe3", "Ethernet-100G"), "RTX-3090": ("PCIe4", "Ethernet-100G"),
    "RTX-4090": ("PCIe4", "Ethernet-100G"), "cpu": ("loopback", "Ethernet-100G"),
})  # fmt: skip


# between a GPU and its host's memory (a cut kept in the host tier, ``perf/cuts.py``): the PCIe
# generation of the card's host interface on its datasheet (SXM modules: the generation of the
# baseboard's PCIe switches, DGX/HGX), or NVLink-C2C on Grace Hopper; the CPU's host is itself.
HOST_LINKS: Mapping[str, str] = MappingProxyType({
    "V100": "PCIe3", "A100-40GB": "PCIe4", "A100-80GB": "PCIe4", "H100-SXM": "PCIe5", "H200": "PCIe5",
    "H100-PCIe": "PCIe5", "L4": "PCIe4", "L40S": "PCIe4", "A10": "PCIe4", "T4": "PCIe3",
    "RTX-3090": "PCIe4", "RTX-4090": "PCIe4", "GH200": "NVLink-C2C",
})  # fmt: skip


def get_interconnect(link: str | Interconnect) -> Interconnect:
    if isinstance(link, Interconnect):
        return link
    if link not in INTERCONNECTS:
        raise TilingError(f"no interconnect {link!r}; known: {', '.join(INTERCONNECTS)}.")
    return INTERCONNECTS[link]
