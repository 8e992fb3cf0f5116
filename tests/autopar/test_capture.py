"""Capture: shapes, module paths, parameters, FLOPs, layers and the capture error."""

import resource

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autopar
from autopar import CaptureError
from autopar.passes.layers import block_of


class MLP(nn.Module):
    """The seeds' L = MSE(w2 · ReLU(w1 x), y)."""

    def __init__(self, d=16, h=64):
        super().__init__()
        self.w1, self.w2 = nn.Linear(d, h, bias=False), nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.w2(F.relu(self.w1(x)))


def test_mlp_nodes_paths_params_and_flops():
    model, x, y = MLP(), torch.randn(8, 16), torch.randn(8, 16)
    graph = autopar.capture(model, (x,), loss_fn=F.mse_loss, target=y)
    ops = {n.op: n for n in graph.nodes.values()}
    w1 = next(n for n in graph.nodes.values() if n.module_path == "w1")
    assert w1.op == "aten.linear.default" and w1.params == ("w1.weight",) and w1.module_type == "Linear"
    assert w1.output.shape == (8, 64) and w1.output.dtype == torch.float32
    assert w1.flops == 2 * 8 * 16 * 64
    # x does not require grad: backward of w1 computes only dW (one matmul), w2's computes dW and dX.
    assert w1.backward_flops == w1.flops
    w2 = next(n for n in graph.nodes.values() if n.module_path == "w2")
    assert w2.backward_flops == 2 * w2.flops
    assert "aten.mse_loss.default" in ops and ops["aten.mse_loss.default"].module_path == "<loss>"
    assert graph.num_params == 2 * 16 * 64 and graph.has_loss and len(graph.inputs) == 2
    assert graph.layers == ()
    assert "test_capture.py" in w1.source


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(self.norm(x))


class Stack(nn.Module):
    def __init__(self, d=8, wide=16):
        super().__init__()
        self.embed = nn.Embedding(32, d)
        self.layers = nn.ModuleList([Block(d), Block(d), Block(d)])
        self.widen = nn.Linear(d, wide)
        self.more = nn.ModuleList([Block(wide)])
        self.head = nn.Linear(wide, 32, bias=False)

    def forward(self, idx):
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x)
        x = self.widen(x)
        for layer in self.more:
            x = layer(x)
        return self.head(x)


def test_layers_are_repeated_blocks_with_structural_signatures():
    idx = torch.randint(0, 32, (2, 5))
    graph = autopar.capture(Stack(), (idx,))
    assert [layer.name for layer in graph.layers] == ["layers.0", "layers.1", "layers.2", "more.0"]
    signatures = [layer.signature for layer in graph.layers]
    assert signatures[0] == signatures[1] == signatures[2] != signatures[3]
    assert graph.layers[1].params == ("layers.1.norm.weight", "layers.1.norm.bias", "layers.1.fc.weight",
                                      "layers.1.fc.bias")
    inside = [n for n in graph.nodes.values() if n.layer == 1]
    assert inside and all(n.module_path.startswith("layers.1") for n in inside)
    assert next(n for n in graph.nodes.values() if n.module_path == "head").layer is None
    assert not graph.has_loss


@pytest.mark.parametrize("path, block", [
    ("layers.3.attn.qkv", "layers.3"), ("stages.1.0.conv1", "stages.1.0"), ("layers.3.mlp.0", "layers.3"),
    ("layers.3.experts.5", "layers.3"), ("head", None), ("", None), ("3", None),
])
def test_block_of(path, block):
    assert block_of(path) == block


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(self.emb(idx))


def test_tied_parameters_are_counted_once():
    graph = autopar.capture(Tied(), (torch.randint(0, 16, (2, 3)),))
    assert graph.num_params == 16 * 8
    tied = [p for p in graph.params.values() if p.tied]
    assert {p.name for p in tied} == {"emb.weight", "head.weight"}


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        if y.sum() > 0:  # the value of a tensor decides Python control flow
            return y * 2
        return y


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Branchy()])

    def forward(self, x):
        return self.blocks[0](x)


def test_untraceable_model_names_op_line_and_module():
    with pytest.raises(CaptureError) as info:
        autopar.capture(Outer(), (torch.randn(2, 4),))
    e = info.value
    assert e.op == "aten.item" and e.module_path == "blocks.0"
    assert "test_capture.py" in e.source and "if y.sum() > 0:" in e.source
    assert "blocks.0" in str(e) and "control flow depends on tensor values" in str(e)


def test_bad_arguments():
    with pytest.raises(TypeError, match="model: found function"):
        autopar.capture(lambda x: x, (torch.ones(1),))
    with pytest.raises(TypeError, match="example_inputs: found Tensor, required a tuple"):
        autopar.capture(MLP(), torch.ones(1, 16))
    with pytest.raises(ValueError, match="found only one of them"):
        autopar.capture(MLP(), (torch.ones(1, 16),), loss_fn=F.mse_loss)


def test_meta_models_allocate_nothing():
    # 2 layers of width 8192 are 1.6B parameters: 6.4 GB if anything were materialized.
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8192, 8192 * 12), nn.GELU(), nn.Linear(8192 * 12, 8192))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    graph = autopar.capture(model, (torch.empty(4, 8192, device="meta"),))
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert graph.num_params == 2 * 8192 * 8192 * 12 + 8192 * 12 + 8192
    assert grown_kib < 1 << 20  # well under 1 GiB
