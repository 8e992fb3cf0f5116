"""Known machines: device specs and links from vendor datasheets, and the local torch.distributed world.

Takes a preset name (or the running process group) and gives a `Cluster`. Every figure names its
source. Tensor-core peaks in datasheets are quoted with 2:4 sparsity; seed 002's H100 table marks
them with `*`; the dense figures used here are half of those.

| preset | device                          | inside a node                 | between nodes                  |
|--------|---------------------------------|-------------------------------|--------------------------------|
| h100   | H100 SXM5 80 GB                 | NVLink 4, 450 GB/s each way   | InfiniBand NDR 400 Gb/s per GPU |
| a100   | A100 SXM4 80 GB                 | NVLink 3, 300 GB/s each way   | InfiniBand HDR 200 Gb/s per GPU |
| v100   | V100 SXM2 16 GB (p3.16xlarge)   | NVLink 2, 150 GB/s each way   | 25 Gb/s Ethernet per node       |
| cpu    | one CPU rank (gloo)             | loopback TCP                  | 10 Gb/s Ethernet                |
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from autopar.cluster import GiB, Cluster, DeviceSpec, Link, PeakFlops

logger = logging.getLogger(__name__)

# H100 SXM5: seed 002's table (FP32 67 TFLOP/s; TF32 989, BF16/FP16 1979, FP8/INT8 3958 with
# sparsity) halved for the tensor-core formats; HBM3 3.35 TB/s; NVLink 4 is 900 GB/s in both
# directions together; one ConnectX-7 NDR 400 Gb/s NIC per GPU (DGX H100).
H100 = DeviceSpec(
    name="H100-SXM5-80GB",
    memory=80 * GiB,
    peak_flops=PeakFlops(fp32=67e12, tf32=989e12 / 2, bf16=1979e12 / 2, fp16=1979e12 / 2,
                         fp8=3958e12 / 2, int8=3958e12 / 2),
    memory_bandwidth=3.35e12,
)
# A100 SXM4 80 GB datasheet: FP32 19.5, TF32 156, BF16/FP16 312, INT8 624 TFLOP/s dense; no FP8;
# HBM2e 2.039 TB/s; NVLink 3 600 GB/s both directions; DGX A100 has one HDR 200 Gb/s NIC per GPU.
A100 = DeviceSpec(
    name="A100-SXM4-80GB",
    memory=80 * GiB,
    peak_flops=PeakFlops(fp32=19.5e12, tf32=156e12, bf16=312e12, fp16=312e12, fp8=0.0, int8=624e12),
    memory_bandwidth=2.039e12,
)
# V100 SXM2 16 GB datasheet: FP32 15.7, FP16 tensor 125, INT8 (dp4a) 62 TOPS; no TF32, BF16 or
# FP8; HBM2 900 GB/s; NVLink 2 300 GB/s both directions. AWS p3.16xlarge (Alpa's evaluation
# cluster): 8 of them per node and 25 Gb/s between nodes, shared by the node's 8 GPUs.
V100 = DeviceSpec(
    name="V100-SXM2-16GB",
    memory=16 * GiB,
    peak_flops=PeakFlops(fp32=15.7e12, tf32=0.0, bf16=0.0, fp16=125e12, fp8=0.0, int8=62e12),
    memory_bandwidth=900e9,
)
# One gloo rank on one x86 core: 2 AVX2 FMA units × 8 fp32 lanes × 2 FLOP × ~3 GHz ≈ 96 GFLOP/s;
# bf16/fp16 run through fp32 units; int8 via VNNI at about twice that. A rough prior only:
# `autopar profile` measures the real figures.
CPU = DeviceSpec(
    name="cpu",
    memory=8 * GiB,
    peak_flops=PeakFlops(fp32=96e9, tf32=96e9, bf16=96e9, fp16=96e9, fp8=0.0, int8=192e9),
    memory_bandwidth=20e9,
    matmul_efficiency=0.5,
    bandwidth_efficiency=0.5,
)

_PRESETS = {
    # name: (device, default devices per node, intra-node link, inter-node link, backend)
    "h100": (H100, 8, Link(bandwidth=450e9, latency=2e-6), Link(bandwidth=400e9 / 8, latency=5e-6), "nccl"),
    "a100": (A100, 8, Link(bandwidth=300e9, latency=2e-6), Link(bandwidth=200e9 / 8, latency=5e-6), "nccl"),
    # 25 Gb/s per node = 3.125 GB/s, shared by 8 GPUs sending at once.
    "v100": (V100, 8, Link(bandwidth=150e9, latency=2e-6), Link(bandwidth=25e9 / 8 / 8, latency=30e-6), "nccl"),
    # gloo over loopback between single-threaded ranks: measured here at about 170 µs per message
    # and 1 GB/s (an all-reduce of 8 B between 2 ranks takes 335 µs, of 64 MB 53 ms).
    "cpu": (CPU, 2, Link(bandwidth=1e9, latency=170e-6), Link(bandwidth=10e9 / 8 / 2, latency=200e-6), "gloo"),
}


def names() -> list[str]:
    return sorted(_PRESETS)


def make(name: str, *, nodes: int = 1, devices_per_node: int | None = None) -> Cluster:
    """`Cluster.preset`: a cluster of `nodes` nodes of the named machine type."""
    if name not in _PRESETS:
        raise ValueError(f"preset: found {name!r}, required one of {', '.join(names())}")
    device, default_per_node, intra, inter, backend = _PRESETS[name]
    per_node = default_per_node if devices_per_node is None else devices_per_node
    return Cluster(name=name, nodes=nodes, devices_per_node=per_node, device=device,
                   intra_node=intra, inter_node=inter, backend=backend)


def local() -> Cluster:
    """The running torch.distributed world, or one device in a plain process.

    Under torchrun with no process group yet, initializes it first (NCCL when CUDA is available,
    gloo otherwise). Nodes and devices per node come from `node_layout`; the device is the one this
    process computes on (`runtime.world.this_device`: its GPU, or a CPU rank in a gloo world or
    where there is no CUDA).
    """
    import dataclasses

    import torch
    import torch.distributed as dist

    from autopar.runtime.world import init_from_env, this_device

    if "WORLD_SIZE" in os.environ:  # a launch whose nodes disagree fails here, before joining the world
        node_layout(os.environ, _env_int(os.environ, "WORLD_SIZE"))
    init_from_env()
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    nodes, per_node = node_layout(os.environ, world) if world > 1 else (1, 1)
    if this_device().type == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        preset = next((p for key, p in (("H100", "h100"), ("A100", "a100"), ("V100", "v100")) if key in props.name),
                      None)
        if preset is None:
            logger.warning("no preset for GPU %r; using H100 figures with its real memory. Run `autopar profile` "
                           "for measured ones.", props.name)
        base = make(preset or "h100", nodes=nodes, devices_per_node=per_node)
        device = dataclasses.replace(base.device, name=props.name, memory=int(props.total_memory))
        return dataclasses.replace(base, name="local-cuda", device=device)
    return dataclasses.replace(make("cpu", nodes=nodes, devices_per_node=per_node), name="local-cpu")


# What torchrun sets for each worker (torch.distributed.run, "Environment Variables"): GROUP_* count
# nodes (one agent per node), LOCAL_* the processes of this node, RANK and WORLD_SIZE the whole job.
_TORCHRUN_INTS = ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK")


def node_layout(env: Mapping[str, str], world: int) -> tuple[int, int]:
    """(nodes, devices per node) of a `world`-process job, from torchrun's environment `env`.

    Devices per node is LOCAL_WORLD_SIZE (default: the whole world, one node), nodes is
    WORLD_SIZE / LOCAL_WORLD_SIZE. torchrun numbers ranks node by node when every node runs the same
    --nproc-per-node: node g (GROUP_RANK) holds ranks g·L … g·L + L - 1, which is what
    `Cluster.node_of` assumes, so a mesh axis that steps by L really crosses nodes. Anything else
    (sizes that do not divide, nodes of unequal sizes, ranks out of that order) is a ValueError
    naming the variables and their values.

        >>> node_layout({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "2"}, 4)
        (2, 2)
    """
    found = {name: _env_int(env, name) for name in _TORCHRUN_INTS if name in env}
    if found.get("WORLD_SIZE", world) != world:
        raise ValueError(f"WORLD_SIZE: found {found['WORLD_SIZE']}, required {world} (the processes in the "
                         f"initialized process group)")
    per_node = found.get("LOCAL_WORLD_SIZE", world)
    if per_node < 1 or world % per_node:
        raise ValueError(f"LOCAL_WORLD_SIZE: found {per_node}, required a divisor of WORLD_SIZE={world} "
                         f"(every node runs the same number of processes)")
    nodes = world // per_node
    if found.get("GROUP_WORLD_SIZE", nodes) != nodes:
        groups = found["GROUP_WORLD_SIZE"]
        raise ValueError(f"GROUP_WORLD_SIZE × LOCAL_WORLD_SIZE: found {groups} × {per_node} = {groups * per_node}, "
                         f"required WORLD_SIZE={world} (nodes of unequal sizes: start every node with the same "
                         f"--nproc-per-node)")
    if {"RANK", "GROUP_RANK", "LOCAL_RANK"} <= found.keys():
        expected = found["GROUP_RANK"] * per_node + found["LOCAL_RANK"]
        if found["RANK"] != expected:
            raise ValueError(f"RANK: found {found['RANK']}, required GROUP_RANK × LOCAL_WORLD_SIZE + LOCAL_RANK = "
                             f"{found['GROUP_RANK']} × {per_node} + {found['LOCAL_RANK']} = {expected} (ranks "
                             f"numbered node by node, as torchrun does when nodes are of equal sizes)")
    return nodes, per_node


def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"{name}: found {env[name]!r}, required an integer (torchrun sets it)") from None
