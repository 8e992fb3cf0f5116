"""A checkpoint on disk: `torch.distributed.checkpoint` (DCP) files, with metadata that is data, not code.

Takes `Piece`s (a tensor key, this rank's part of it and where that part starts in the whole
tensor); gives DCP planners that write and read exactly those parts, and a storage writer and
reader whose `.metadata` is JSON. DCP does the rest: it de-duplicates replicated parts across
ranks, writes one `__<rank>_0.distcp` file per rank, and on load reads, for each part a rank
wants, the overlapping regions of the saved parts (resharding to any placement and world size).

Parts are described by offsets, not by `DTensor`s: a rank's part under placements (one per mesh
axis) is the box that `runtime.collectives.transform` cuts (`torch.chunk` per `Shard`, outer
axis first), computed by `box`, so what is saved is what the runtime holds, for a one-stage
world and for a pipeline stage's submesh alike.

Nothing read from a file is executed: DCP's own `.metadata` is a pickle, which would run whatever
a crafted file names, so this one is JSON, parsed into DCP's metadata classes field by field;
tensor data is read by DCP with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.tensor import Replicate, Shard

from autopar.errors import AutoparError

METADATA = ".metadata"
FORMAT = "autopar-dcp-json/1"
_DATA_FILE = re.compile(r"^__\d+_\d+\.distcp$")


class CheckpointError(AutoparError, ValueError):
    """A checkpoint that is missing, incomplete, unreadable or made for another model."""


@dataclass(frozen=True, slots=True)
class Piece:
    """This rank's part of one saved tensor."""

    key: str
    """Plan-independent: `model/<state_dict key>` or `optim/<parameter>/<state name>`."""
    tensor: torch.Tensor
    """The part (what is written; on load, what is filled in place)."""
    shape: tuple[int, ...]
    """The whole tensor's shape."""
    offsets: tuple[int, ...]
    """Where the part starts in the whole tensor, per dim."""
    write: bool = True
    """False where another rank of another stage writes the same tensor (a tied parameter's copy)."""


def box(shape: tuple[int, ...], placements: tuple, mesh_shape: tuple[int, ...],
        coordinate: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offsets, sizes) of the part at `coordinate` of a tensor placed `placements` on a mesh.

    Each `Shard(d)` cuts dim d as `torch.chunk` does (pieces of ceil(size / n), the last ones
    shorter or empty), the outer mesh axis first: the cut `runtime.collectives.transform` makes.

    >>> box((10, 4), (Shard(0), Shard(0)), (2, 2), (1, 0))   # rows 5..7 of 10
    ((5, 0), (3, 4))
    """
    offsets, sizes = [0] * len(shape), list(shape)
    for axis, p in enumerate(placements):
        if isinstance(p, Shard):
            n, i, d = mesh_shape[axis], coordinate[axis], p.dim
            step = math.ceil(sizes[d] / n) if sizes[d] else 0
            start = min(i * step, sizes[d])
            offsets[d] += start
            sizes[d] = min(step, sizes[d] - start)
        elif not isinstance(p, Replicate):
            raise AssertionError(f"a stored tensor placed {p} (only Shard and Replicate hold whole values)")
    return tuple(offsets), tuple(sizes)


# -- planners -----------------------------------------------------------------------------------------


class PieceSavePlanner(DefaultSavePlanner):
    """Writes each `Piece` as a chunk at its offsets (DCP's global planning de-duplicates the
    replicated ones and checks that the chunks of every tensor tile it)."""

    def __init__(self, pieces: list[Piece]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        written = [p for p in pieces if p.write and p.tensor.numel() > 0]
        self.pieces = {p.key: p for p in written}
        assert len(self.pieces) == len(written), "a rank writes each key once"

    def create_local_plan(self) -> SavePlan:
        items = []
        for key, p in self.pieces.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(p.offsets), sizes=p.tensor.size())
            properties = TensorProperties(dtype=p.tensor.dtype)
            items.append(WriteItem(index=MetadataIndex(key, p.offsets), type=WriteItemType.SHARD,
                                   tensor_data=TensorWriteData(chunk=chunk, properties=properties,
                                                               size=torch.Size(p.shape))))
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        return self.pieces[write_item.index.fqn].tensor.detach()


class PieceLoadPlanner(DefaultLoadPlanner):
    """Fills each `Piece` in place from the saved chunks that overlap it."""

    def __init__(self, pieces: list[Piece]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.pieces = pieces

    def set_up_planner(self, state_dict, metadata: Metadata | None = None, is_coordinator: bool = False) -> None:
        self.state_dict, self.metadata, self.is_coordinator = state_dict, metadata, is_coordinator

    def create_local_plan(self) -> LoadPlan:
        items = []
        for i, p in enumerate(self.pieces):
            if p.tensor.numel() == 0:
                continue
            chunk = ChunkStorageMetadata(offsets=torch.Size(p.offsets), sizes=p.tensor.size())
            for item in create_read_items_for_chunk_list(p.key, self.metadata.state_dict_metadata[p.key], [chunk]):
                # the destination by position: one key may fill two parts here (a tied copy per stage)
                items.append(dataclasses.replace(item, dest_index=MetadataIndex(p.key, p.offsets, i)))
        return LoadPlan(items)

    def resolve_tensor(self, read_item) -> torch.Tensor:
        target = self.pieces[read_item.dest_index.index].tensor.detach()
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            target = target.narrow(dim, start, length)
        return target

    def commit_tensor(self, read_item, tensor: torch.Tensor) -> None:
        """Nothing to do: the part was filled in place."""


# -- storage with JSON metadata -------------------------------------------------------------------------


class JsonMetadataWriter(FileSystemWriter):
    """DCP's file system writer, its `.metadata` written as JSON (then fsynced and renamed into place)."""

    def finish(self, metadata: Metadata, results) -> None:
        storage = {wr.index: wr.storage_data for rank in results for wr in rank}
        text = json.dumps(metadata_to_json(metadata, storage))
        path = Path(self.path)
        write_file(path / (METADATA + ".tmp"), text)
        os.replace(path / (METADATA + ".tmp"), path / METADATA)


class JsonMetadataReader(FileSystemReader):
    """DCP's file system reader, given the metadata already parsed (`read_metadata_file`)."""

    def __init__(self, path: str | os.PathLike, metadata: Metadata) -> None:
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self) -> Metadata:
        return self._metadata


def write_file(path: Path, text: str) -> None:
    """Write and fsync: a file renamed into place afterwards is whole on disk."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def metadata_to_json(metadata: Metadata, storage: dict) -> dict:
    """DCP's metadata as plain data: each tensor's dtype, shape and chunks; where each chunk lies."""
    tensors = {}
    for key, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            raise AssertionError(f"checkpoint entry {key}: only tensors are written, found {type(md).__name__}")
        tensors[key] = {"dtype": str(md.properties.dtype).removeprefix("torch."), "shape": list(md.size),
                        "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes)} for c in md.chunks]}
    chunks = [{"key": index.fqn, "offsets": list(index.offset), "file": info.relative_path, "start": info.offset,
               "length": info.length} for index, info in storage.items()]
    return {"format": FORMAT, "tensors": tensors, "storage": chunks}


def read_metadata_file(directory: Path) -> Metadata:
    """The `.metadata` of a checkpoint directory, parsed as JSON; CheckpointError for anything else."""
    path = directory / METADATA
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: found {len(raw)} bytes that are not JSON (starting {raw[:16]!r}), required "
                              f"the JSON metadata autopar writes; a pickled .metadata is never loaded, since "
                              f"unpickling runs code the file names") from e
    try:
        return metadata_from_json(data)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from e


def metadata_from_json(data) -> Metadata:
    """The inverse of `metadata_to_json`, checking every field's type."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"format: found {found!r}, required {FORMAT!r}")
    tensors = {}
    for key, t in _typed(data["tensors"], dict, "tensors").items():
        chunks = [ChunkStorageMetadata(offsets=_size(c["offsets"]), sizes=_size(c["sizes"]))
                  for c in _typed(t["chunks"], list, f"{key} chunks")]
        tensors[_typed(key, str, "key")] = TensorStorageMetadata(
            properties=TensorProperties(dtype=_dtype(t["dtype"])), size=_size(t["shape"]), chunks=chunks)
    storage = {}
    for c in _typed(data["storage"], list, "storage"):
        name = _typed(c["file"], str, "file")
        if not _DATA_FILE.match(name):
            raise ValueError(f"data file: found {name!r}, required a name like __0_0.distcp in the checkpoint")
        index = MetadataIndex(_typed(c["key"], str, "key"), _size(c["offsets"]))
        storage[index] = _StorageInfo(relative_path=name, offset=_typed(c["start"], int, "start"),
                                      length=_typed(c["length"], int, "length"))
    return Metadata(state_dict_metadata=tensors, storage_data=storage)


def _typed(value, kind: type, what: str):
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{what}: found {type(value).__name__}, required {kind.__name__}")
    return value


def _size(values) -> torch.Size:
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                               for v in values):
        raise ValueError(f"sizes and offsets: found {values!r}, required a list of non-negative integers")
    return torch.Size(values)


def _dtype(name) -> torch.dtype:
    value = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype: found {name!r}, required a torch dtype name such as 'float32'")
    return value
