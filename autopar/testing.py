"""Testing aids: a pool of local gloo ranks that runs many training cases, and the single-device
reference they are compared with.

    with RankPool(4) as pool:
        results = pool.run([{"model": "gpt-tiny", "strategy": "tp", "steps": 5}, ...])

Processes start once per pool (the expensive part); each case then builds the zoo model with a fixed
seed on every rank, compiles it (rank 0 plans), trains, and returns rank 0's losses and whole state
dict. Messages are JSON over pipes; nothing is pickled. A case that raises comes back as
{"error": "..."} with the exception and traceback, and the pool stays usable. A case may instead
name a function to run on every rank, `{"call": "module:function", "kwargs": {...}}` (the checks of
`autopar.checks`).
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import os
import traceback
from typing import Any

import torch

from autopar.runtime.world import free_port  # noqa: F401 (tests take it from here)

DEFAULTS = {"batch": 8, "steps": 5, "lr": 1e-3, "seed": 0, "strategy": "auto", "timeout": 60.0, "optimizer": "adamw",
            "dtype": "float32"}


def _optimizer(case: dict):
    if case["optimizer"] == "sgd":
        return lambda ps: torch.optim.SGD(ps, lr=case["lr"])
    return lambda ps: torch.optim.AdamW(ps, lr=case["lr"], eps=case.get("eps", 1e-8))


def case_batch(entry, case: dict, step: int):
    inputs, target = entry.example_batch(case["batch"], seed=step, **_batch_overrides(case))
    dtype = getattr(torch, case["dtype"])
    cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
    return tuple(cast(x) for x in inputs), cast(target)


def reference(case: dict[str, Any]) -> dict[str, Any]:
    """The case trained on one device, in plain PyTorch: losses and state dict. On one thread, as
    the pool's ranks run: a CPU convolution sums in an order that depends on the thread count (on
    some processors), and AdamW grows that last-bit difference past rtol 1e-5 of the loss in five
    steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference({**DEFAULTS, **case})
    finally:
        torch.set_num_threads(threads)


def _reference(case: dict[str, Any]) -> dict[str, Any]:
    from autopar import models

    entry = models.get(case["model"])
    model = entry.build(seed=case["seed"], dtype=getattr(torch, case["dtype"]), **case.get("overrides", {}))
    if case.get("quantize"):
        from autopar.quant.modules import quantize_model

        model = quantize_model(model, case["quantize"])
    optimizer = _optimizer(case)(list(p for p in model.parameters() if p.requires_grad) or [torch.zeros(1)])
    losses = []
    for step in range(case["steps"]):
        inputs, target = case_batch(entry, case, step)
        _seed(case, step)
        optimizer.zero_grad()
        loss = entry.loss_fn(model(*inputs), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"losses": losses, "state": {k: v.tolist() for k, v in model.state_dict().items()}}


def _seed(case: dict, step: int) -> None:
    """The default generator's state for a step's random draws (dropout), the same on the one
    device and on every rank, and after a restart from a checkpoint."""
    torch.manual_seed(case["seed"] * 1_000_003 + step)


def _batch_overrides(case: dict) -> dict:
    return {k: v for k, v in case.get("overrides", {}).items() if k == "seq_len"}


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """One case on this rank (inside a pool worker, or under torchrun)."""
    import autopar
    from autopar import models

    case = {**DEFAULTS, **case}
    entry = models.get(case["model"])
    model = entry.build(seed=case["seed"], dtype=getattr(torch, case["dtype"]), **case.get("overrides", {}))
    inputs, target = case_batch(entry, case, 0)
    plan = autopar.Plan.from_json(case["plan"]) if case.get("plan") else None
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    cluster = autopar.Cluster.preset("cpu", gpus_per_node=world)
    _seed(case, -1)  # the ranks agree from here (`runtime.dropout.check_random`)
    if case.get("seed_apart"):  # each rank its own seed, as many data-parallel scripts do
        torch.manual_seed(torch.distributed.get_rank())
    with _reused_captures(json.dumps([case["model"], case.get("overrides", {}), case["dtype"],
                                      case.get("quantize")])):
        compiled = autopar.compile(model, cluster, example_inputs=inputs, loss_fn=entry.loss_fn, target=target,
                                   optimizer=_optimizer(case), plan=plan, precision=case.get("precision", "fp32"),
                                   quantize=case.get("quantize"),
                                   strategy=case["strategy"], timeout=case["timeout"])
    try:
        losses = []
        crash = case.get("crash")  # {"rank": r, "step": k}: that rank dies as step k begins
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        start = compiled.load(case["load"]) if case.get("load") else 0  # a checkpoint: train on from its step
        for step in range(start, case["steps"]):
            if crash and crash["rank"] == rank and crash["step"] == step:
                os._exit(17)
            inputs, target = case_batch(entry, case, step)
            overflow = case.get("overflow")  # {"rank": r, "step": k}: that rank's gradients turn inf in step k
            if overflow and overflow["rank"] == rank and overflow["step"] == step:
                leaf = compiled.optimizer_leaves()[0]
                handle = leaf.register_hook(lambda g: torch.full_like(g, float("inf")))
            _seed(case, step)
            losses.append(compiled.step(*inputs, target=target).item())
            if overflow and overflow["rank"] == rank and overflow["step"] == step:
                handle.remove()
        if case.get("save"):  # a checkpoint directory, written after the last step
            compiled.save(case["save"])
        state = compiled.state_dict()
        result = {"losses": losses, "state": {k: v.tolist() for k, v in state.items()},
                  "strategy": compiled.plan.strategy, "mesh": list(compiled.plan.stages[0].mesh.shape)}
        if getattr(compiled, "scaler", None) is not None:
            result["scaler"] = compiled.scaler.state_dict()
        return result
    finally:
        compiled.close()


_CAPTURES: dict[tuple, Any] = {}


@contextlib.contextmanager
def _reused_captures(model_key: str):
    """Inside a pool worker, cases that build the same zoo model reuse its captured step for the
    same input shapes (capture is deterministic; torch.export is the slow part of a small case)."""
    import autopar.compiler as compiler

    original = compiler.capture

    def capture(model, example_inputs, **kwargs):
        leaves = torch.utils._pytree.tree_leaves((example_inputs, kwargs.get("target")))
        key = (model_key, kwargs.get("precision", "fp32"),
               tuple((tuple(x.shape), str(x.dtype)) for x in leaves if isinstance(x, torch.Tensor)))
        if key not in _CAPTURES:
            _CAPTURES[key] = original(model, example_inputs, **kwargs)
        return _CAPTURES[key]

    compiler.capture = capture
    try:
        yield
    finally:
        compiler.capture = original


def _worker(rank: int, world: int, port: int, conn, timeout: float = 120.0) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import datetime

    import torch.distributed as dist

    if world > 1:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    while True:
        message = conn.recv_bytes()
        if message == b"stop":
            break
        case = json.loads(message)
        try:
            result = _call(case) if "call" in case else run_case(case)
        except BaseException as e:  # noqa: BLE001 - reported to the test, which decides
            result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        conn.send_bytes(json.dumps(result).encode())
    if world > 1:
        dist.destroy_process_group()


def _call(case: dict[str, Any]) -> Any:
    """Run `module:function` (a check written for many ranks) with the case's keyword arguments."""
    import importlib

    module, name = case["call"].split(":")
    return getattr(importlib.import_module(module), name)(**case.get("kwargs", {}))


class RankPool:
    """`world` local processes joined in one gloo group, kept alive across cases."""

    def __init__(self, world: int, timeout: float = 120.0) -> None:
        """`timeout`: seconds a collective waits for a missing rank before failing."""
        self.world = world
        context = mp.get_context("spawn")
        port = free_port()
        self.conns, self.procs = [], []
        for rank in range(world):
            parent, child = context.Pipe()
            proc = context.Process(target=_worker, args=(rank, world, port, child, timeout), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def run(self, cases: list[dict[str, Any]], timeout: float = 600.0) -> list[dict[str, Any]]:
        """Rank 0's result for each case (every rank's error, when any rank failed)."""
        results = []
        for case in cases:
            for conn in self.conns:
                conn.send_bytes(json.dumps(case).encode())
            answers = []
            for rank, conn in enumerate(self.conns):
                try:
                    if not conn.poll(timeout):
                        raise TimeoutError(f"rank {rank} gave no answer within {timeout} s for {case}")
                    answers.append(json.loads(conn.recv_bytes()))
                except (EOFError, ConnectionResetError):
                    answers.append({"error": f"rank {rank} exited (code {self.procs[rank].exitcode})", "rank": rank})
            errors = [a for a in answers if "error" in a]
            results.append({**errors[0], "errors": [a["error"] for a in errors]} if errors else answers[0])
        return results

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs):
            if proc.is_alive():
                try:
                    conn.send_bytes(b"stop")
                except (BrokenPipeError, OSError):
                    pass
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def differences(case: dict[str, Any], got: dict[str, Any], *, parameters: bool) -> list[str]:
    """How a case's result differs from the single-device run (empty when it does not): losses
    within rtol 1e-5 in fp32 and 1e-10 in fp64; with `parameters`, every parameter and buffer
    within rtol 1e-8, atol 1e-10 in fp64, and torch.testing's float32 defaults (rtol 1.3e-6, atol
    1e-5) in fp32."""
    if "error" in got:
        return [got["error"] + "\n" + got.get("traceback", "")]
    ref = reference(case)
    wide = case.get("dtype") == "float64"
    rel = 1e-10 if wide else 1e-5
    out = [f"losses: found {got['losses']}, required {ref['losses']} (rtol {rel:g})"
           for _ in [0] if len(got["losses"]) != len(ref["losses"]) or not all(
               math.isclose(a, b, rel_tol=rel) for a, b in zip(got["losses"], ref["losses"]))]
    if parameters:
        if set(got["state"]) != set(ref["state"]):
            out.append(f"state keys: found {sorted(got['state'])}, required {sorted(ref['state'])}")
        tolerance = {"rtol": 1e-8, "atol": 1e-10} if wide else {"rtol": 1.3e-6, "atol": 1e-5}
        for key in sorted(set(got["state"]) & set(ref["state"])):
            try:
                torch.testing.assert_close(torch.tensor(got["state"][key]), torch.tensor(ref["state"][key]),
                                           **tolerance)
            except AssertionError as e:
                out.append(f"{key}: {e}")
    return out
