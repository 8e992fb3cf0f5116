"""The device cluster: nodes × devices per node, what one device can do, and the links between them.

Takes numbers (a preset, a JSON file, or the running torch.distributed world) and gives a frozen,
validated `Cluster` that the cost model reads. Units are SI throughout: bytes, seconds, FLOP/s and
bytes/s; nothing is in "GB" except what is printed.

    >>> c = Cluster.preset("h100", nodes=2, gpus_per_node=8)
    >>> c.num_devices, c.device.peak("bf16") / 1e12
    (16, 989.5)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autopar.files import parse_json, read_json, write_atomic

if TYPE_CHECKING:
    from autopar.cost.profile import Profile

GiB = 1 << 30
DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8")
BACKENDS = ("nccl", "gloo")


def _check_number(owner: str, field: str, value: Any, *, positive: bool, integer: bool = False) -> None:
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ValueError(f"{owner}.{field}: found {value!r} ({type(value).__name__}), required {kind}")
    if not math.isfinite(value):
        raise ValueError(f"{owner}.{field}: found {value!r}, required a finite number")
    if positive and value <= 0:
        raise ValueError(f"{owner}.{field}: found {value!r}, required > 0")
    if not positive and value < 0:
        raise ValueError(f"{owner}.{field}: found {value!r}, required >= 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class PeakFlops:
    """Dense peak throughput per dtype in FLOP/s (OP/s for int8); 0 where the device lacks the format.

    Datasheets often quote tensor-core peaks *with 2:4 sparsity*; these are the dense figures (half).
    """

    fp32: float
    tf32: float
    bf16: float
    fp16: float
    fp8: float
    int8: float

    def __post_init__(self) -> None:
        for name in DTYPES:
            _check_number("PeakFlops", name, getattr(self, name), positive=False)
        if self.fp32 <= 0:
            raise ValueError(f"PeakFlops.fp32: found {self.fp32!r}, required > 0 (every device computes in fp32)")


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceSpec:
    """One accelerator (or one CPU rank)."""

    name: str
    """Free text, shown in summaries: a device is its figures, so a cluster file may describe any
    device, not only the presets' (`autopar.presets`)."""
    memory: int
    """Device memory in bytes."""
    peak_flops: PeakFlops
    memory_bandwidth: float
    """Bytes/s between device memory and the compute units."""
    matmul_efficiency: float = 0.6
    """Fraction of peak a large matmul reaches in practice (the profiler replaces it with a measurement)."""
    bandwidth_efficiency: float = 0.8
    """Fraction of memory bandwidth a streaming element-wise kernel reaches."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"DeviceSpec.name: found {self.name!r}, required a non-empty string")
        _check_number("DeviceSpec", "memory", self.memory, positive=True, integer=True)
        if not isinstance(self.peak_flops, PeakFlops):
            raise ValueError(f"DeviceSpec.peak_flops: found {type(self.peak_flops).__name__}, required PeakFlops")
        _check_number("DeviceSpec", "memory_bandwidth", self.memory_bandwidth, positive=True)
        for field in ("matmul_efficiency", "bandwidth_efficiency"):
            value = getattr(self, field)
            _check_number("DeviceSpec", field, value, positive=True)
            if value > 1:
                raise ValueError(f"DeviceSpec.{field}: found {value!r}, required a fraction in (0, 1]")

    def peak(self, dtype: str) -> float:
        """Dense peak FLOP/s for `dtype`; ValueError if the device has no such format."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype: found {dtype!r}, required one of {', '.join(DTYPES)}")
        value = getattr(self.peak_flops, dtype)
        if value <= 0:
            supported = [d for d in DTYPES if getattr(self.peak_flops, d) > 0]
            raise ValueError(f"{self.name} has no {dtype} support; it supports {', '.join(supported)}")
        return value


@dataclass(frozen=True, kw_only=True, slots=True)
class Link:
    """A communication link in the alpha-beta model of seed 002: a message of n bytes takes α + n/B."""

    bandwidth: float
    """B, bytes/s per device in one direction, when every device of a node sends at once."""
    latency: float
    """α, seconds per message."""

    def __post_init__(self) -> None:
        _check_number("Link", "bandwidth", self.bandwidth, positive=True)
        _check_number("Link", "latency", self.latency, positive=False)

    @property
    def beta(self) -> float:
        """β = 1/B, seconds per byte."""
        return 1.0 / self.bandwidth


@dataclass(frozen=True, kw_only=True, slots=True)
class Cluster:
    """`nodes` × `devices_per_node` identical devices; device d lives on node d // devices_per_node."""

    name: str
    nodes: int
    devices_per_node: int
    device: DeviceSpec
    intra_node: Link
    """Links between devices of one node (NVLink, PCIe, loopback)."""
    inter_node: Link
    """Links between nodes (InfiniBand, Ethernet)."""
    backend: str = "nccl"
    """The torch.distributed backend that runs on it: "nccl" for GPUs, "gloo" for CPUs."""
    profile: Profile | None = None
    """What `autopar profile` measured (`autopar.cost.profile`); the cost model prefers it where present."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Cluster.name: found {self.name!r}, required a non-empty string")
        _check_number("Cluster", "nodes", self.nodes, positive=True, integer=True)
        _check_number("Cluster", "devices_per_node", self.devices_per_node, positive=True, integer=True)
        for field, kind in (("device", DeviceSpec), ("intra_node", Link), ("inter_node", Link)):
            if not isinstance(getattr(self, field), kind):
                found = type(getattr(self, field)).__name__
                raise ValueError(f"Cluster.{field}: found {found}, required {kind.__name__}")
        if self.backend not in BACKENDS:
            raise ValueError(f"Cluster.backend: found {self.backend!r}, required one of {', '.join(BACKENDS)}")
        if self.profile is not None:
            from autopar.cost.profile import Profile

            if not isinstance(self.profile, Profile):
                raise ValueError(f"Cluster.profile: found {type(self.profile).__name__}, required Profile or None")

    @property
    def num_devices(self) -> int:
        return self.nodes * self.devices_per_node

    def node_of(self, device: int) -> int:
        if not 0 <= device < self.num_devices:
            raise ValueError(f"device: found {device}, required 0 <= device < {self.num_devices}")
        return device // self.devices_per_node

    def link_between(self, a: int, b: int) -> Link:
        """The link a message from device `a` to device `b` crosses."""
        return self.intra_node if self.node_of(a) == self.node_of(b) else self.inter_node

    def describe(self) -> str:
        d = self.device
        return (f"{self.name}: {self.nodes} node(s) × {self.devices_per_node} {d.name} "
                f"({d.memory / GiB:.0f} GiB, bf16 {d.peak_flops.bf16 / 1e12:.1f} TFLOP/s dense), "
                f"intra-node {self.intra_node.bandwidth / 1e9:.1f} GB/s, "
                f"inter-node {self.inter_node.bandwidth / 1e9:.2f} GB/s per device"
                f"{', profiled' if self.profile is not None else ''}")

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, *, nodes: int = 1, gpus_per_node: int | None = None) -> Cluster:
        """A cluster of a known machine type; see `autopar.presets` for the figures and sources."""
        from autopar import presets

        return presets.make(name, nodes=nodes, devices_per_node=gpus_per_node)

    @classmethod
    def local(cls) -> Cluster:
        """The torch.distributed world this process runs in (one device when none is initialized)."""
        from autopar import presets

        return presets.local()

    def to_dict(self) -> dict[str, Any]:
        """Plain data; "profile" only when there is one, so unprofiled clusters read as before."""
        data = dataclasses.asdict(self)
        if self.profile is None:
            del data["profile"]
        return data

    @classmethod
    def from_dict(cls, data: Any) -> Cluster:
        """Builds a Cluster from plain data, field by field; wrong types and unknown fields raise."""
        fields = _read_fields("Cluster", data, cls)
        fields["device"] = _device_from_dict(fields["device"])
        for name in ("intra_node", "inter_node"):
            fields[name] = _make(f"Cluster.{name}", Link, fields[name])
        if fields.get("profile") is not None:
            from autopar.cost.profile import Profile

            fields["profile"] = Profile.from_dict(fields["profile"])
        return cls(**fields)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Cluster:
        return cls.from_dict(parse_json(text, "cluster file"))

    def save(self, path: str | os.PathLike) -> None:
        """Writes the JSON atomically (`autopar.files.write_atomic`)."""
        write_atomic(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Cluster:
        """Reads a file `save` wrote (JSON only; nothing in it is executed); errors name the file."""
        data = read_json(path, "cluster file")
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"cluster file {path}: {e}") from None


def _read_fields(owner: str, data: Any, kind: type) -> dict[str, Any]:
    """The fields of dataclass `kind` from a dict: unknown and missing (required) ones raise."""
    if not isinstance(data, dict):
        raise ValueError(f"{owner}: found {type(data).__name__}, required a JSON object")
    known = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{owner}: found unknown field(s) {unknown}, required only {sorted(known)}")
    required = [n for n, f in known.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise ValueError(f"{owner}: missing field(s) {missing}, required all of {required}")
    return dict(data)


def _make(owner: str, kind: type, data: Any) -> Any:
    """`kind` built from the dict `data` (as `_read_fields` reads it); its own checks' errors are
    prefixed with `owner`, the path in the file: "Cluster.intra_node: Link.bandwidth: found -1.0, …"."""
    fields = _read_fields(owner, data, kind)
    try:
        return kind(**fields)
    except ValueError as e:
        raise ValueError(f"{owner}: {e}") from None


def _device_from_dict(data: Any) -> DeviceSpec:
    fields = _read_fields("Cluster.device", data, DeviceSpec)
    fields["peak_flops"] = _make("Cluster.device.peak_flops", PeakFlops, fields["peak_flops"])
    return _make("Cluster.device", DeviceSpec, fields)
