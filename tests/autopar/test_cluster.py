"""Cluster presets, validation, JSON round trip and the local world."""

import dataclasses
import json

import pytest

from autopar import Cluster, DeviceSpec, Link, PeakFlops
from autopar.cluster import GiB


def test_h100_preset_matches_seed_table_dense():
    c = Cluster.preset("h100", nodes=2, gpus_per_node=8)
    assert c.num_devices == 16 and c.node_of(7) == 0 and c.node_of(8) == 1
    d = c.device
    # Seed 002: BF16/FP16 1979, FP8/INT8 3958, TF32 989 TFLOP/s with sparsity; FP32 67 (no sparsity).
    assert d.peak("bf16") == 1979e12 / 2 == d.peak("fp16")
    assert d.peak("fp8") == 3958e12 / 2 == d.peak("int8")
    assert d.peak("tf32") == 989e12 / 2 and d.peak("fp32") == 67e12
    assert d.memory == 80 * GiB
    assert c.intra_node.bandwidth > c.inter_node.bandwidth
    assert c.link_between(0, 7) is c.intra_node and c.link_between(0, 8) is c.inter_node


def test_v100_is_alpas_p3_16xlarge():
    c = Cluster.preset("v100", nodes=8)
    assert c.devices_per_node == 8 and c.device.memory == 16 * GiB
    assert c.inter_node.bandwidth * 8 == pytest.approx(25e9 / 8)  # 25 Gb/s per node, shared by 8 GPUs
    with pytest.raises(ValueError, match="no bf16 support"):
        c.device.peak("bf16")


def test_a100_and_cpu_presets():
    assert Cluster.preset("a100").device.peak("bf16") == 312e12
    cpu = Cluster.preset("cpu", gpus_per_node=4)
    assert cpu.backend == "gloo" and cpu.num_devices == 4


def test_json_round_trip(tmp_path):
    c = Cluster.preset("h100", nodes=4)
    path = tmp_path / "cluster.json"
    c.save(path)
    assert Cluster.load(path) == c
    assert json.loads(path.read_text())["device"]["peak_flops"]["bf16"] == 1979e12 / 2


@pytest.mark.parametrize("change, message", [
    (dict(nodes=0), "Cluster.nodes: found 0, required > 0"),
    (dict(devices_per_node=-8), "Cluster.devices_per_node: found -8, required > 0"),
    (dict(devices_per_node=2.5), "Cluster.devices_per_node: found 2.5 .float., required an integer"),
    (dict(backend="mpi"), "Cluster.backend: found 'mpi', required one of nccl, gloo"),
])
def test_bad_cluster_values(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(Cluster.preset("h100"), **change)


def test_bad_link_and_device_values():
    with pytest.raises(ValueError, match="Link.bandwidth: found -1.0, required > 0"):
        Link(bandwidth=-1.0, latency=1e-6)
    with pytest.raises(ValueError, match="Link.latency: found -1e-06, required >= 0"):
        Link(bandwidth=1e9, latency=-1e-6)
    peaks = PeakFlops(fp32=1e12, tf32=0, bf16=0, fp16=0, fp8=0, int8=0)
    with pytest.raises(ValueError, match="DeviceSpec.memory: found 0, required > 0"):
        DeviceSpec(name="x", memory=0, peak_flops=peaks, memory_bandwidth=1e9)
    with pytest.raises(ValueError, match=r"matmul_efficiency: found 1.5, required a fraction in \(0, 1\]"):
        DeviceSpec(name="x", memory=1, peak_flops=peaks, memory_bandwidth=1e9, matmul_efficiency=1.5)
    with pytest.raises(ValueError, match="PeakFlops.fp32: found 0"):
        PeakFlops(fp32=0, tf32=0, bf16=0, fp16=0, fp8=0, int8=0)
    with pytest.raises(ValueError, match="dtype: found 'fp64'"):
        Cluster.preset("h100").device.peak("fp64")


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="preset: found 'tpu', required one of a100, cpu, h100, v100"):
        Cluster.preset("tpu")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("nodes"), r"Cluster: missing field\(s\) \['nodes'\]"),
    (lambda d: d.update(colour="blue"), r"Cluster: found unknown field\(s\) \['colour'\]"),
    (lambda d: d.update(nodes="2"), "Cluster.nodes: found '2' .str., required an integer"),
    (lambda d: d["intra_node"].update(bandwidth=None), "Link.bandwidth: found None"),
    (lambda d: d["device"]["peak_flops"].pop("fp8"), r"peak_flops: missing field\(s\) \['fp8'\]"),
    (lambda d: d.update(device=[1, 2]), "Cluster.device: found list, required a JSON object"),
])
def test_malformed_cluster_files(edit, message):
    data = Cluster.preset("h100").to_dict()
    edit(data)
    with pytest.raises(ValueError, match=message):
        Cluster.from_json(json.dumps(data))


def test_not_json_at_all():
    with pytest.raises(ValueError, match="malformed JSON"):
        Cluster.from_json("{nodes: 2")


def test_local_is_one_device_without_a_process_group():
    c = Cluster.local()
    assert c.num_devices == 1 and c.nodes == 1


def test_local_in_a_gloo_world_is_a_cpu_even_where_cuda_is_available(monkeypatch):
    """A gloo world runs on CPUs (runtime.world): planning it as the machine's GPU would price it wrong."""
    import torch
    import torch.distributed as dist

    from autopar.testing import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        c = Cluster.local()
        assert c.name == "local-cpu" and c.backend == "gloo" and c.num_devices == 1
    finally:
        dist.destroy_process_group()
