"""Checkpoints that survive re-planning: a compiled model's state saved as its plan holds it, loaded under any plan.

    compiled.save("ckpt")          # on every rank: parameters, optimizer state, step count, plan
    step = compiled.load("ckpt")   # any plan and world size (fsdp on 4 ranks -> tp on 2, pipelined -> dp)

Every tensor is saved under a plan-independent key, `model/<state_dict key>` or
`optim/<parameter>/<state name>`, each rank writing the part it holds (`checkpoint_format.box`),
and loading fills each part the new plan holds from whatever parts were saved
(`torch.distributed.checkpoint`). A checkpoint directory holds:

    .metadata, __<rank>_0.distcp   the tensors (DCP; the metadata as JSON)
    plan.json                      the plan it was saved under
    state.json                     step count, loss scaler, the optimizer's hyperparameters, the
                                   random generators' states (rank 0's; every rank's are set to them)
    manifest.json                  written last: each file and its size

Saving is atomic: everything is written into a sibling `.<name>.partial`, the manifest last, then
renamed into place. A directory without a manifest is never loaded; a crash mid-save leaves the
previous checkpoint whole. `runtime.restarts.Checkpoints` keeps numbered ones (`autopar run --save-every`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import Replicate

from autopar.runtime.checkpoint_format import (FORMAT, CheckpointError, JsonMetadataReader, JsonMetadataWriter,
                                               Piece, PieceLoadPlanner, PieceSavePlanner, box, read_metadata_file,
                                               write_file)
from autopar.runtime.collectives import transform
from autopar.runtime.dropout import decode_generator_states, generator_states, set_generator_states
from autopar.runtime.optimizer_state import OPTIM, materialize, param_of, restore_hyperparameters, saved_states

logger = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def save(model, path: str | os.PathLike) -> Path:
    """Write `model`'s state to directory `path`, replacing a checkpoint there. Every rank calls."""
    path = Path(path)
    partial = _sibling(path, "partial")
    on_rank_zero(lambda: _prepare(path, partial), model)
    pieces = model_pieces(model, saving=True) + optimizer_pieces(model)
    try:
        with _one_process_quietly():
            dcp.save({p.key: p.tensor for p in pieces}, storage_writer=JsonMetadataWriter(partial),
                     planner=PieceSavePlanner(pieces), no_dist=not _distributed())
    except CheckpointException as e:
        raise CheckpointError(f"saving {path}: {_first_failure(e)} (the previous checkpoint, if any, is "
                              f"kept)") from None
    random = generator_states()
    on_rank_zero(lambda: _finish(model, path, partial, random), model)
    return path


def load(model, path: str | os.PathLike) -> int:
    """Fill `model` (compiled under any plan) from the checkpoint at `path`; the step count saved."""
    error = None
    try:  # each rank checks the parts it holds; all of them go on, or all raise
        directory = complete(Path(path))
        metadata = read_metadata_file(directory)
        state = json.loads((directory / "state.json").read_text())
        random = _random_states(directory, state)
        if model.optimizer is not None:
            materialize(model.optimizer, _leaves(model), saved_states(metadata.state_dict_metadata))
        pieces = model_pieces(model, saving=False) + optimizer_pieces(model)
        _check(model, pieces, metadata.state_dict_metadata, directory)
    except Exception as e:  # noqa: BLE001 - re-raised by `agree`, and reported to the other ranks
        error = e
    agree(error, model)
    try:
        with _one_process_quietly():
            dcp.load({p.key: p.tensor for p in pieces}, storage_reader=JsonMetadataReader(directory, metadata),
                     planner=PieceLoadPlanner(pieces), no_dist=not _distributed())
    except CheckpointException as e:
        raise CheckpointError(f"loading {directory}: {_first_failure(e)}") from None
    for holders, groups, _, _ in _parts(model):  # ZeRO's whole copies, from the loaded shards
        for holder in holders.values():
            if holder.group is None:
                holder.refresh()
        for group in groups:
            group.refresh()
    model.step_count = int(state["step"])
    if getattr(model, "scaler", None) is not None and state.get("scaler"):
        model.scaler.load_state_dict(state["scaler"])
    if model.optimizer is not None:
        restore_hyperparameters(model.optimizer, state.get("param_groups", []))
    set_generator_states(random)
    return model.step_count


def _random_states(directory: Path, state: dict) -> dict[str, torch.Tensor]:
    """state.json's generator states, decoded (none in checkpoints written before they were kept)."""
    try:
        return decode_generator_states(state.get("random") or {})
    except ValueError as e:
        raise CheckpointError(f"checkpoint {directory}: state.json: {e}") from None


def complete(path: Path) -> Path:
    """`path` when it holds a whole checkpoint (its manifest's files present, at their sizes); its
    `.previous` sibling when a replacing save was cut short between its two renames."""
    for candidate in (path, _sibling(path, "previous")):
        if (candidate / MANIFEST).is_file():
            if candidate != path:
                logger.warning("%s: not in place (a save was interrupted); loading the previous one, %s",
                               path, candidate)
            _check_manifest(candidate)
            return candidate
    what = "no such directory" if not path.exists() else f"no {MANIFEST} (an incomplete save, or not a checkpoint)"
    raise CheckpointError(f"checkpoint {path}: found {what}, required a directory written by save()")


# -- what is saved --------------------------------------------------------------------------------------------


def _parts(model):
    """(holders, groups, world, writes) per stage this rank runs; `writes(name)` is False for a tied
    parameter's copy in a later stage (the first stage holding it saves it)."""
    if not hasattr(model, "chunks"):
        return [(model.holders, model.groups, model.world, lambda name: True)]
    first = {}
    for j, stage in enumerate(model.plan.stages):
        for name in stage.params:
            first.setdefault(name, j)
    return [(c.holders, c.groups, c.world, lambda name, j=c.index: first[name] == j) for c in model.chunks]


def _leaves(model) -> dict[str, torch.Tensor]:
    return {name: h.leaf for holders, _, _, _ in _parts(model) for name, h in holders.items() if h.leaf.requires_grad}


def _part(key: str, tensor: torch.Tensor, holder, world, write: bool) -> Piece:
    """The part of a parameter-shaped tensor this rank holds, placed as the parameter's leaf."""
    offsets, sizes = box(holder.plan.shape, holder.leaf_placement, world.mesh.shape, world.coordinate)
    assert sizes == tuple(tensor.shape), f"{key}: local {tuple(tensor.shape)}, box {sizes}"
    return Piece(key, tensor, tuple(holder.plan.shape), offsets, write)


def _whole(key: str, tensor: torch.Tensor, write: bool = True) -> Piece:
    return Piece(key, tensor, tuple(tensor.shape), (0,) * tensor.dim(), write)


def model_pieces(model, *, saving: bool) -> list[Piece]:
    """Parameters (each state_dict key, tied names included) and buffers."""
    pieces = []
    for holders, _, world, writes in _parts(model):
        for key in model._state_keys:
            name = _holder_name(model.captured, key, holders)
            if name is not None:
                pieces.append(_part(f"model/{key}", holders[name].leaf, holders[name], world, writes(name)))
    return pieces + _buffer_pieces(model, saving)


def _holder_name(captured, key: str, holders: dict) -> str | None:
    if key in holders:
        return key
    info = captured.params.get(key)
    return next((t for t in info.tied if t in holders), None) if info else None


def _buffer_pieces(model, saving: bool) -> list[Piece]:
    """Buffers whole: saved from a stage that runs them (made whole first where an op updates them
    split), loaded into every copy."""
    pieces = []
    if not hasattr(model, "chunks"):
        for key in model._state_keys:
            name = model._buffer_name(key)
            if name is None:
                continue
            value, placed = model._buffers[name], model._buffer_placements.get(key)
            if saving and placed is not None:
                whole = tuple(Replicate() for _ in placed)
                value = transform(transform(value, whole, placed, model.world), placed, whole, model.world)
            pieces.append(_whole(f"model/{key}", value))
        return pieces
    from autopar.runtime.pipeline import _buffer_keys

    for key, placeholder in _buffer_keys(model.captured).items():
        if key not in model._state_keys:
            continue
        if saving:
            j, fetch, _ = model._owner(key)
            if j in model.mine:
                pieces.append(_whole(f"model/{key}", fetch(model.mine[j])))
        else:
            pieces += [_whole(f"model/{key}", c.buffers[placeholder]) for c in model.chunks if placeholder in c.buffers]
    return pieces


def optimizer_pieces(model) -> list[Piece]:
    """Each parameter's optimizer state under `optim/<parameter>/<name>`: tensors of the leaf's
    shape placed as the leaf, others (Adam's `step`) whole."""
    if model.optimizer is None:
        return []
    pieces = []
    for holders, _, world, writes in _parts(model):
        for name, holder in sorted(holders.items()):
            for state, value in sorted(model.optimizer.state.get(holder.leaf, {}).items()):
                key = f"{OPTIM}{name}/{state}"
                if not isinstance(value, torch.Tensor):
                    raise CheckpointError(f"{key}: found a {type(value).__name__} in the optimizer's state, "
                                          f"required tensors (what torch's optimizers keep)")
                if value.dim() > 0 and value.shape == holder.leaf.shape:
                    pieces.append(_part(key, value, holder, world, writes(name)))
                else:
                    pieces.append(_whole(key, value, writes(name)))
    return pieces


def _check(model, pieces: list[Piece], saved: dict, directory: Path) -> None:
    """Every tensor this rank holds is in the checkpoint at its shape, and nothing of another model is."""
    for p in {p.key: p for p in pieces}.values():
        md = saved.get(p.key)
        if md is None:
            raise CheckpointError(f"{p.key}: found no such tensor in {directory}, required one for this model "
                                  f"(a checkpoint of another model?)")
        if tuple(md.size) != p.shape:
            raise CheckpointError(f"{p.key}: found shape {tuple(md.size)} in {directory}, required {p.shape} "
                                  f"(this model's)")
    keys, params = {f"model/{k}" for k in model._state_keys}, set(model.captured.params)
    extra = sorted(k for k in saved if k not in keys and not (k.startswith(OPTIM) and param_of(k) in params))
    if extra:
        raise CheckpointError(f"{extra[0]}: found in {directory} ({len(extra)} such), required none: this model "
                              f"has no such state (a checkpoint of another model?)")


# -- writing in place -----------------------------------------------------------------------------------------


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}")


def _prepare(path: Path, partial: Path) -> None:
    """Rank 0 before a save: refuse to replace what is not a checkpoint; clear a stale partial one."""
    if path.is_dir() and not (path / MANIFEST).is_file():
        if any(path.iterdir()):
            raise CheckpointError(f"checkpoint {path}: found a directory that is not a checkpoint (no {MANIFEST}), "
                                  f"required a new path or a checkpoint to replace")
        path.rmdir()
    shutil.rmtree(partial, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)


def _finish(model, path: Path, partial: Path, random: dict[str, str]) -> None:
    """Rank 0 after every rank wrote its data: the JSON files, the manifest last, then the renames."""
    write_file(partial / "plan.json", model.plan.to_json())
    scaler = getattr(model, "scaler", None)
    groups = [] if model.optimizer is None else [
        {k: v for k, v in g.items() if k != "params" and _number_like(v)} for g in model.optimizer.param_groups]
    write_file(partial / "state.json", json.dumps({"step": model.step_count, "param_groups": groups,
                                                   "scaler": scaler.state_dict() if scaler else None,
                                                   "random": random}))
    files = {f.name: f.stat().st_size for f in sorted(partial.iterdir())}
    write_file(partial / MANIFEST, json.dumps({"format": FORMAT, "step": model.step_count, "files": files}))
    _sync_directory(partial)
    previous = _sibling(path, "previous")
    if path.exists():  # two renames: until the second, `complete` finds the old one as `previous`
        shutil.rmtree(previous, ignore_errors=True)
        os.rename(path, previous)
    os.rename(partial, path)
    _sync_directory(path.parent)
    shutil.rmtree(previous, ignore_errors=True)


def _number_like(value) -> bool:
    """A hyperparameter kept in state.json: a number, or a tuple of numbers (Adam's betas)."""
    values = value if isinstance(value, (tuple, list)) else (value,)
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _check_manifest(directory: Path) -> None:
    manifest = json.loads((directory / MANIFEST).read_text())
    for name, size in manifest.get("files", {}).items():
        f = directory / name
        found = f.stat().st_size if f.is_file() else None
        if found != size:
            raise CheckpointError(f"checkpoint {directory}: file {name} found {'missing' if found is None else found} "
                                  f"{'' if found is None else 'bytes'}, required {size} bytes (as its manifest says)")


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- agreeing across ranks ------------------------------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _one_process_quietly():
    """DCP warns that it assumes one process when torch.distributed is not initialized: here that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def on_rank_zero(work, model) -> None:
    """Run `work` on rank 0; every rank raises if it failed."""
    error = None
    if not _distributed() or dist.get_rank() == 0:
        try:
            work()
        except (OSError, CheckpointError) as e:
            error = e
    agree(error, model)


def agree(error: BaseException | None, model) -> None:
    """Collective: every rank raises when any rank had an error, its own or the first failing rank's
    message (so that none goes on into a collective the others have left)."""
    if _distributed() and dist.get_world_size() > 1:
        size, device = dist.get_world_size(), model.world.device
        first = torch.tensor([dist.get_rank() if error is not None else size], device=device)
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
        src = int(first.item())
        if src < size:
            text = _broadcast_text(f"{type(error).__name__}: {error}" if error is not None else "", device, src)
            if error is None:
                raise CheckpointError(f"rank {src} failed: {text}")
    if error is not None:
        raise error


def _broadcast_text(text: str, device: torch.device, src: int) -> str:
    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=device)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    dist.broadcast(size, src=src)
    if dist.get_rank() != src:
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    if data.numel():
        dist.broadcast(data, src=src)
    return bytes(data.cpu().tolist()).decode()


def _first_failure(e: CheckpointException) -> str:
    rank, (error, _) = next(iter(sorted(e.failures.items(), key=lambda kv: kv[0])))
    return f"rank {rank}: {type(error).__name__}: {error}"
