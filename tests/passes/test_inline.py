"""Grad-mode and disabled-autocast regions are inlined into plain ATen ops, with the same values and gradients."""

import torch
import torch.nn as nn

import autopar


class Scaled(nn.Module):
    """y = W x scaled by a factor computed without grad (as a rotary table is), then by one computed
    under a disabled autocast: the gradient reaches W through y only."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        with torch.no_grad():
            scale = y.abs().mean() + 1.0  # no gradient flows back through the scale
        with torch.autocast("cpu", enabled=False):
            shift = torch.tanh(y) * 0.5
        return y * scale + shift


def _higher_order(graph) -> list[str]:
    return [n.format_node() for n in graph.nodes
            if n.op == "call_function" and isinstance(n.target, torch._ops.HigherOrderOperator)]


def test_wrapped_regions_become_aten_ops_with_the_same_gradients():
    torch.manual_seed(0)
    model, x = Scaled(), torch.randn(3, 4)
    graph = autopar.capture(model, (x,))
    assert _higher_order(graph.program.graph) == []
    ops = [n.op for n in graph.nodes.values()]
    assert "aten.detach.default" in ops  # the no-grad region's output
    assert all(n.outputs for n in graph.nodes.values() if n.op.startswith("aten."))  # every op has a shape

    program = torch.export.export(model, (x,), strict=False)
    from autopar.passes.inline import inline_wrappers

    assert inline_wrappers(program) >= 1 and _higher_order(program.graph) == []
    inlined = program.module()
    got = inlined(x)
    got.sum().backward()
    want = model(x)
    want.sum().backward()
    torch.testing.assert_close(got, want)
    grads = dict(inlined.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad)
