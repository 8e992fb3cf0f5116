"""Roofline per node, the profiled-table override, and MFU."""

import pytest
import torch

from autopar import Cluster
from autopar.cost.compute import ComputeModel, ProfileTable, mfu, roofline_time
from autopar.graph import NodeInfo, TensorMeta

H100 = Cluster.preset("h100").device


def node(flops, moved, dtype=torch.bfloat16, **kw):
    return NodeInfo(name="n", op="aten.mm.default", outputs=(TensorMeta((64, 64), dtype),), inputs=(),
                    module_path="", module_type="", flops=flops, backward_flops=2 * flops, bytes_moved=moved,
                    requires_grad=True, **kw)


def test_roofline_takes_the_slower_side():
    compute_bound = roofline_time(1e15, 1e6, H100, "bf16")
    assert compute_bound == pytest.approx(1e15 / (989.5e12 * H100.matmul_efficiency))
    memory_bound = roofline_time(1e6, 1e10, H100, "bf16")
    assert memory_bound == pytest.approx(1e10 / (3.35e12 * H100.bandwidth_efficiency))


def test_node_time_uses_dtype_shards_and_backward():
    model = ComputeModel(H100)
    n = node(1e12, 1e3)
    assert model.node_time(n) == pytest.approx(1e12 / (989.5e12 * 0.6))
    assert model.node_time(n, shards=4) == pytest.approx(model.node_time(n) / 4)
    assert model.node_time(n, backward=True) == pytest.approx(2 * model.node_time(n))
    fp32 = node(1e12, 1e3, dtype=torch.float32)
    assert ComputeModel(H100).node_time(fp32) == pytest.approx(1e12 / (67e12 * 0.6))
    assert ComputeModel(H100, fp32_matmul="tf32").node_time(fp32) == pytest.approx(1e12 / (494.5e12 * 0.6))


def test_profiled_table_overrides_the_roofline():
    n = node(1e12, 1e3)
    table = ProfileTable({ProfileTable.key("aten.mm.default", ((64, 64),), "bf16"): 0.5})
    assert ComputeModel(H100, table=ProfileTable.from_json(table.to_json())).node_time(n, shards=2) == 0.25


def test_mfu_seed_definition():
    # Seed 002: MFU = #FLOPs / t / peak FLOPS. 6 PFLOP in 10 s on 1 PFLOP/s peak is 60%.
    assert mfu(6e15, 10.0, 1e15) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="required both > 0"):
        mfu(1.0, 0.0, 1.0)


def test_unsupported_dtype_is_an_error():
    v100 = Cluster.preset("v100").device
    with pytest.raises(ValueError, match="V100-SXM2-16GB has no bf16 support"):
        ComputeModel(v100).node_time(node(1e9, 1e3))
