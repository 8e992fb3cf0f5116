"""Capture: a model and example inputs become an ATen-level graph with per-node costs and layers.

    captured = autopar.capture(model, (tokens,), loss_fn=F.cross_entropy, target=targets)
    print(captured.summary())

Steps, top to bottom:
1. wrap `loss_fn(model(*inputs), target)` in a module, so the loss is part of the graph;
2. `torch.export.export(..., strict=False)` traces it at ATen level on fake tensors (a model on
   the meta device stays there, so GPT-3 175B is captured without allocating a byte); the
   grad-mode and disabled-autocast regions export wraps are inlined (`passes.inline`); for bf16 or
   fp16, `passes.precision` inserts the mixed-precision casts;
3. `passes.analyze` measures FLOPs, bytes moved and saved-for-backward bytes per node;
4. `passes.layers` finds the repeated blocks.

Why no `torch.fx.symbolic_trace` fallback: non-strict export runs the model's Python code as
is, with concrete shapes, so every model symbolic tracing accepts (no value-dependent control
flow, no tensor-to-Python conversions) it accepts too, and it yields ATen ops rather than
module calls. A model neither can trace gets a `CaptureError` naming the op, the source line
and the module.
"""

from __future__ import annotations

import contextlib
import logging
import re
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch.export.graph_signature import InputKind
from torch.utils import _pytree as pytree

from autopar.errors import CaptureError
from autopar.graph import CapturedGraph, NodeInfo, ParamInfo, TensorMeta
from autopar.passes.analyze import analyze
from autopar.passes.inline import inline_wrappers
from autopar.passes.layers import find_layers
from autopar.passes.precision import low_precision

logger = logging.getLogger(__name__)
_MODEL = "model"  # attribute under which the user's model sits in the capture wrapper
_LOSS_PATH = "<loss>"


class _Step(nn.Module):
    """`(loss_fn(output, target), output)` with `output = model(*inputs)`; just the output when no
    loss is given. The output stays in the graph so a compiled model can also run forward only."""

    def __init__(self, model: nn.Module, loss_fn: Callable | None) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *args):
        if self.loss_fn is None:
            return self.model(*args)
        *inputs, target = args
        output = self.model(*inputs)
        return self.loss_fn(output, target), output


def capture(model: nn.Module, example_inputs: tuple, *, loss_fn: Callable | None = None,
            target: Any = None, precision: str = "fp32") -> CapturedGraph:
    """The model's step as a `CapturedGraph`; with `loss_fn`, the loss against `target` is included.
    `precision` "bf16" or "fp16": rewritten for mixed precision (`passes.precision`) before costs."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: found {type(model).__name__}, required a torch.nn.Module")
    if not isinstance(example_inputs, tuple):
        raise TypeError(f"example_inputs: found {type(example_inputs).__name__}, required a tuple of inputs")
    if (loss_fn is None) != (target is None):
        raise ValueError("loss_fn and target: found only one of them, required both (training) or neither")
    _check_not_empty(example_inputs, target)

    device = _model_device(model)
    args = tuple(_on_device(x, device) for x in example_inputs)
    if loss_fn is not None:
        args += (_on_device(target, device),)
    program = _export(_Step(model, loss_fn), args)
    inline_wrappers(program)  # grad-mode and autocast regions become plain ATen ops
    _forget_values(program)
    low_precision(program, precision)

    # Step 3: costs, then records with the user's names.
    params, grad_inputs, state_inputs = _params(program, model)
    costs = analyze(program.graph, grad_inputs=grad_inputs, param_inputs=state_inputs)
    nodes = _node_infos(program, costs, {p.placeholder: p.name for p in params.values()}, loss_fn is not None)
    # Step 4: repeated blocks.
    layers, layer_of = find_layers(program.graph, nodes, {p.placeholder for p in params.values()})
    nodes = {name: _with_layer(info, layer_of.get(name)) for name, info in nodes.items()}
    user_inputs = tuple(s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT)
    output = next(n for n in program.graph.nodes if n.op == "output")
    outputs = tuple(a.name if isinstance(a, torch.fx.Node) else "" for a in pytree.tree_leaves(output.args))
    return CapturedGraph(program=program, nodes=nodes, params=params, inputs=user_inputs,
                         has_loss=loss_fn is not None, layers=layers, outputs=outputs, precision=precision)


def _check_not_empty(example_inputs: tuple, target: Any) -> None:
    """A tensor without elements (a batch of 0) leaves nothing to cost: refused by its place in the inputs."""
    for where, value in (("example_inputs", example_inputs), ("target", target)):
        for path, x in pytree.tree_flatten_with_path(value)[0]:
            if isinstance(x, torch.Tensor) and x.ndim and not x.numel():
                raise ValueError(f"{where}{pytree.keystr(path)}: found shape {tuple(x.shape)} with no elements, "
                                 f"required a non-empty tensor (a batch of at least one)")


def _forget_values(program: torch.export.ExportedProgram) -> None:
    """Keep only the shapes of the parameters and buffers the exported program holds: their values
    are read from the model when compiling, and a reference here would keep every rank's whole
    unsharded model alive for as long as the compiled one (lifted constants stay: they are read)."""
    state = program.state_dict  # the property has no setter; the dict is the program's own
    for k, v in state.items():
        shape_only = torch.empty_like(v, device="meta")
        state[k] = nn.Parameter(shape_only, requires_grad=v.requires_grad) if isinstance(v, nn.Parameter) else shape_only


def _model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _on_device(value: Any, device: torch.device) -> Any:
    """A distinct copy of every tensor: on meta for a meta model (free), else an empty one on `device`.

    Distinct, because export merges inputs that are the same tensor object into one graph input.
    """
    def convert(x):
        if not isinstance(x, torch.Tensor):
            return x
        if x.device == device:
            return x.detach().clone() if device.type != "meta" else torch.empty_like(x)
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=device)

    return pytree.tree_map(convert, value)


@contextlib.contextmanager
def _module_stack(model: nn.Module):
    """Tracks which module's forward is running, to name it when tracing fails."""
    stack: list[str] = []

    def enter(name: str):
        def hook(module, args) -> None:
            stack.append(name)
        return hook

    def leave(module, args, output) -> None:
        stack.pop()

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def _export(step: _Step, args: tuple) -> torch.export.ExportedProgram:
    quiet = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with _module_stack(step.model) as stack:
            try:
                return torch.export.export(step, args, strict=False)
            except Exception as e:  # noqa: BLE001 - every tracing failure becomes a CaptureError
                raise _capture_error(e, list(stack)) from e
    finally:
        quiet.setLevel(level)


def _capture_error(e: Exception, stack: list[str]) -> CaptureError:
    module = stack[-1] if stack else ""
    module = module.removeprefix(_MODEL + ".") if module != _MODEL else ""
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "/torch/" not in f.filename and f.filename != __file__ and not f.filename.startswith("<")]
    source = f"{frames[-1].filename}:{frames[-1].lineno} `{frames[-1].line}`" if frames else "unknown"
    text = str(e)
    ops = re.findall(r"torch\.ops\.(aten\.\w+)", text)
    if "data-dependent" in text or "GuardOnDataDependent" in type(e).__name__:
        op = ops[-1] if ops else "aten.item"
        what = (f"control flow depends on tensor values ({op}: a tensor converted to a Python "
                f"bool/int/float)")
        required = ("control flow that depends only on shapes; use torch.where, masking or "
                    "torch.cond for value-dependent branches")
    else:
        op = ops[-1] if ops else type(e).__name__
        what = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
        required = "a model torch.export can trace (strict=False)"
    return CaptureError(f"cannot capture the model: {what}, at {source} in module "
                        f"{module or '<top>'!r}; required: {required}",
                        op=op, source=source, module_path=module)


def _params(program: torch.export.ExportedProgram, model: nn.Module) -> tuple[dict[str, ParamInfo], set[str], set[str]]:
    """Parameter records, the placeholders that require grad, and the placeholders that are state."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    names_of = {n: tuple(ns) for ns in by_id.values() for n in ns}
    requires = {name: p.requires_grad for name, p in model.named_parameters(remove_duplicate=False)}

    params: dict[str, ParamInfo] = {}
    grad_inputs: set[str] = set()
    state: set[str] = set()
    for spec in program.graph_signature.input_specs:
        if spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            state.add(spec.arg.name)
        if spec.kind != InputKind.PARAMETER:
            continue
        fqn = spec.target.removeprefix(_MODEL + ".")
        val = next(n for n in program.graph.nodes if n.name == spec.arg.name).meta["val"]
        params[fqn] = ParamInfo(name=fqn, meta=TensorMeta(tuple(val.shape), val.dtype), placeholder=spec.arg.name,
                                tied=tuple(n for n in names_of.get(fqn, (fqn,)) if n != fqn),
                                requires_grad=requires.get(fqn, True))
        state.add(spec.arg.name)
        if params[fqn].requires_grad:
            grad_inputs.add(spec.arg.name)
    return params, grad_inputs, state


def _module_of(node: torch.fx.Node, has_loss: bool) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ("", "")
    path, kind = list(stack.values())[-1]
    kind = kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"
    if path == _MODEL or path.startswith(_MODEL + "."):
        return path.removeprefix(_MODEL).removeprefix("."), kind.rsplit(".", 1)[-1]
    return (_LOSS_PATH if has_loss else "", kind.rsplit(".", 1)[-1])


def _source_of(node: torch.fx.Node) -> str:
    """The innermost frame of the user's own code (not torch's, not autopar's) that made the node."""
    found = re.findall(r'File "([^"]+)", line (\d+)', node.meta.get("stack_trace") or "")
    user = [(f, line) for f, line in found if "/torch/" not in f and f != __file__]
    return f"{user[-1][0]}:{user[-1][1]}" if user else ""


def _node_infos(program, costs, param_of: dict[str, str], has_loss: bool) -> dict[str, NodeInfo]:
    infos: dict[str, NodeInfo] = {}
    for node in program.graph.nodes:
        vals = node.meta.get("val")
        vals = list(vals) if isinstance(vals, (list, tuple)) else [vals]
        outputs = tuple(TensorMeta(tuple(v.shape), v.dtype) for v in vals if isinstance(v, torch.Tensor))
        inputs = tuple(dict.fromkeys(a.name for a in node.all_input_nodes))
        path, kind = _module_of(node, has_loss) if node.op == "call_function" else ("", "")
        cost = costs.get(node.name)
        op = node.op if node.op != "call_function" else _op_name(node.target)
        infos[node.name] = NodeInfo(
            name=node.name, op=op, outputs=outputs, inputs=inputs, module_path=path, module_type=kind,
            params=tuple(param_of[i] for i in inputs if i in param_of),
            flops=cost.flops if cost else 0, backward_flops=cost.backward_flops if cost else 0,
            bytes_moved=cost.bytes_moved if cost else 0, saved_bytes=cost.saved_bytes if cost else 0,
            internal_saved=cost.internal_saved if cost else 0,
            alias_of=cost.alias_of if cost else None, requires_grad=cost.requires_grad if cost else False,
            source=_source_of(node))
    return infos


def _op_name(target) -> str:
    name = str(target)
    return name if not name.startswith("<built-in function") else f"operator.{target.__name__}"


def _with_layer(info: NodeInfo, layer: int | None) -> NodeInfo:
    import dataclasses

    return dataclasses.replace(info, layer=layer) if layer is not None else info
