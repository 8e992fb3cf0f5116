"""Compute cost: the roofline per node, a profiled table that overrides it, and MFU.

    time = max(FLOPs / (peak(dtype) · matmul_efficiency), bytes / (memory_bandwidth · bandwidth_efficiency))

(Williams, Waterman and Patterson, "Roofline", CACM 2009.) Matmuls land on the FLOP side, element-wise
ops, norms and views on the bytes side. Where a `ProfileTable` has a measured time for the op, shapes
and dtype, that time is used instead.

    MFU = model FLOPs / time / peak FLOP/s          (seed 002)

On a profiled cluster (`Cluster.profile`) the measured figures replace the roofline's, and each
kernel pays the measured fixed overhead o once (forward, and again in backward):

    time = o + max(FLOPs / rate(dtype, FLOPs) − o, bytes / measured bandwidth)

rate is the achieved matmul rate interpolated between the measured shapes by FLOPs
(`Profile.matmul_rate`); a measured rate includes one call's overhead, taken off here so that it
is paid once. Without a profile, nothing changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from autopar.cluster import DeviceSpec
from autopar.cost.profile import Profile
from autopar.files import parse_json
from autopar.graph import NodeInfo

DTYPE_NAMES = {
    torch.float32: "fp32", torch.float64: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
    torch.int8: "int8", torch.uint8: "int8", torch.float8_e4m3fn: "fp8", torch.float8_e5m2: "fp8",
}


def roofline_time(flops: float, bytes_moved: float, device: DeviceSpec, dtype: str = "fp32") -> float:
    """Seconds for a kernel doing `flops` and moving `bytes_moved` on `device` in `dtype`."""
    compute = flops / (device.peak(dtype) * device.matmul_efficiency) if flops else 0.0
    memory = bytes_moved / (device.memory_bandwidth * device.bandwidth_efficiency)
    return max(compute, memory)


def kernel_time(flops: float, bytes_moved: float, device: DeviceSpec, dtype: str = "fp32",
                profile: Profile | None = None) -> float:
    """`roofline_time`, or with a profile the measured form of the module docstring. A kernel that
    neither computes nor moves bytes (a view) costs nothing either way."""
    if profile is None:
        return roofline_time(flops, bytes_moved, device, dtype)
    if not flops and not bytes_moved:
        return 0.0
    overhead = profile.kernel_overhead
    compute = 0.0
    if flops:
        rate = profile.matmul_rate(dtype, flops)
        compute = max(flops / rate - overhead, 0.0) if rate else flops / (device.peak(dtype) * device.matmul_efficiency)
    return overhead + max(compute, bytes_moved / profile.memory_bandwidth)


def mfu(model_flops: float, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilization (seed 002): the fraction of peak the model's own FLOPs achieve.
    `peak_flops` is the whole job's: devices × per-device peak. Recomputation does not count."""
    if seconds <= 0 or peak_flops <= 0:
        raise ValueError(f"mfu: found seconds={seconds}, peak_flops={peak_flops}; required both > 0")
    return model_flops / seconds / peak_flops


@dataclass(frozen=True)
class ProfileTable:
    """Measured kernel times in seconds, keyed by `key(op, input shapes, dtype)`."""

    entries: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def key(op: str, shapes: tuple[tuple[int, ...], ...], dtype: str) -> str:
        return f"{op}|{';'.join('x'.join(map(str, s)) for s in shapes)}|{dtype}"

    def to_json(self) -> str:
        return json.dumps(self.entries, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ProfileTable:
        """Strict JSON (`autopar.files.parse_json`): an object of key → seconds, each checked."""
        data = parse_json(text, "profile table")
        if not isinstance(data, dict):
            raise ValueError(f"profile table: found {type(data).__name__}, required a JSON object of key → seconds")
        for key, value in data.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"profile table[{key!r}]: found {value!r}, required seconds >= 0")
        return cls(dict(data))


class ComputeModel:
    """Per-node compute time on one device. `fp32_matmul="tf32"` models TF32 tensor cores for fp32.
    `profile` (a cluster's `Cluster.profile`): the measured rates, bandwidth and kernel overhead."""

    def __init__(self, device: DeviceSpec, *, table: ProfileTable | None = None, fp32_matmul: str = "fp32",
                 profile: Profile | None = None) -> None:
        if fp32_matmul not in ("fp32", "tf32"):
            raise ValueError(f"fp32_matmul: found {fp32_matmul!r}, required 'fp32' or 'tf32'")
        self.device = device
        self.table = table or ProfileTable()
        self.fp32_matmul = fp32_matmul
        self.profile = profile

    def dtype_of(self, node: NodeInfo) -> str:
        out = node.output
        name = DTYPE_NAMES.get(out.dtype, "fp32") if out is not None else "fp32"
        return self.fp32_matmul if name == "fp32" else name

    def node_time(self, node: NodeInfo, *, shards: int = 1, backward: bool = False) -> float:
        """Seconds for the node's forward (or backward) when its work is split `shards` ways."""
        if node.op in ("placeholder", "output"):
            return 0.0
        if shards < 1:
            raise ValueError(f"shards: found {shards}, required >= 1")
        if not backward:
            measured = self.table.entries.get(ProfileTable.key(node.op, tuple(o.shape for o in node.outputs),
                                                               self.dtype_of(node)))
            if measured is not None:
                return measured / shards
        flops = node.backward_flops if backward else node.flops
        # Backward reads the saved inputs and the output gradient and writes input gradients:
        # about twice the forward traffic.
        moved = node.bytes_moved * (2 if backward else 1)
        if backward and not node.requires_grad:
            return 0.0
        return kernel_time(flops / shards, moved / shards, self.device, self.dtype_of(node), self.profile)
