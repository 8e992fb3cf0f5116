"""The distributed world a compiled model runs in: the process group, the mesh, and who is alive.

Takes the torchrun environment (or an already initialized process group) and a plan's
`LogicalMesh`; gives a `World`: this rank, its device, its coordinate on the mesh, and one process
group per mesh axis (from `torch.distributed.device_mesh`, so groups are PyTorch's own).

Failures: every rank keeps a heartbeat in the process group's store. When a collective fails or
times out, the ranks whose heartbeat stopped are named in the `RankFailure` raised, so a dead
rank makes the others exit with a clear message rather than hang.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import socket
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from autopar.errors import AutoparError
from autopar.vocab import LogicalMesh

logger = logging.getLogger(__name__)
DEFAULT_TIMEOUT = 300.0
_BEAT = 0.5  # seconds between heartbeats


class RankFailure(AutoparError):
    """Another rank stopped: names it, what this rank was doing, and the underlying error."""


def init_from_env(timeout: float = DEFAULT_TIMEOUT) -> None:
    """Initialize the default process group from torchrun's environment, if there is one and no
    group exists yet: NCCL when CUDA is available, gloo otherwise."""
    if not dist.is_available() or dist.is_initialized() or "WORLD_SIZE" not in os.environ:
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))


@dataclass
class World:
    rank: int
    size: int
    device: torch.device
    mesh: LogicalMesh
    coordinate: tuple[int, ...]
    groups: list
    """One process group per mesh axis (None in a one-process world)."""
    timeout: float = DEFAULT_TIMEOUT
    processes: int = 0
    """Processes in the whole job (more than `size` for a pipeline stage's world); 0: `size`."""
    timing: bool = False
    """A world made in one process to time the runtime's kernels as one rank runs them
    (`cost.timers.kernel_timer`): it has no process groups, and its kernels leave out their
    collectives, which the cost model prices apart."""
    _heart: threading.Thread | None = field(default=None, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    @classmethod
    def for_timing(cls, mesh_shape: tuple[int, ...], device: torch.device) -> World:
        """Rank 0 of a mesh of `mesh_shape`, made in one process with no process groups, to time
        what a rank runs (`cost.timers`); its kernels leave out their collectives (`timing`)."""
        mesh = LogicalMesh(shape=tuple(mesh_shape), devices=tuple(range(math.prod(mesh_shape))))
        return cls(rank=0, size=mesh.size, device=device, mesh=mesh, coordinate=(0,) * len(mesh_shape),
                   groups=[None] * len(mesh_shape), timing=True)

    @classmethod
    def create(cls, mesh: LogicalMesh, timeout: float = DEFAULT_TIMEOUT) -> World:
        init_from_env(timeout)
        initialized = dist.is_available() and dist.is_initialized()
        size = dist.get_world_size() if initialized else 1
        if size != mesh.size:
            raise ValueError(f"world size: found {size} process(es), required {mesh.size} (the plan's devices, "
                             f"mesh {'×'.join(map(str, mesh.shape))}); launch with --nproc {mesh.size} or re-plan")
        rank = dist.get_rank() if initialized else 0
        device = this_device()
        groups: list = [None] * mesh.ndim
        if size > 1:
            from torch.distributed.device_mesh import init_device_mesh

            device_mesh = init_device_mesh(device.type, mesh.shape)
            groups = [device_mesh.get_group(a) for a in range(mesh.ndim)]
        world = cls(rank=rank, size=size, device=device, mesh=mesh, coordinate=mesh.coordinate(rank), groups=groups,
                    timeout=timeout)
        world._start_heartbeat()
        return world

    @classmethod
    def stages(cls, meshes: list[LogicalMesh], timeout: float = DEFAULT_TIMEOUT) -> dict[LogicalMesh, World]:
        """A world per distinct mesh this rank belongs to (pipeline stages): every rank creates every
        axis group of every mesh, in one order (`new_group` is collective over the whole job)."""
        init_from_env(timeout)
        initialized = dist.is_available() and dist.is_initialized()
        processes = dist.get_world_size() if initialized else 1
        needed = len({d for mesh in meshes for d in mesh.devices})
        if processes != needed:
            raise ValueError(f"world size: found {processes} process(es), required {needed} (the plan's devices "
                             f"over {len(meshes)} pipeline stages); launch with --nproc {needed} or re-plan")
        rank, device = (dist.get_rank() if initialized else 0), this_device()
        out: dict[LogicalMesh, World] = {}
        for mesh in dict.fromkeys(meshes):
            groups: list = [None] * mesh.ndim
            for axis in range(mesh.ndim):
                for members in mesh.groups(axis):
                    group = dist.new_group(list(members)) if processes > 1 else None
                    if rank in members:
                        groups[axis] = group
            if rank in mesh.devices:
                out[mesh] = cls(rank=rank, size=mesh.size, device=device, mesh=mesh, coordinate=mesh.coordinate(rank),
                                groups=groups, timeout=timeout, processes=processes)
        first = next(iter(out.values()))
        first._start_heartbeat()
        for world in out.values():
            world._stop = first._stop
        return out

    def axis_rank(self, axis: int) -> int:
        return self.coordinate[axis]

    def axis_size(self, axis: int) -> int:
        return self.mesh.shape[axis]

    # -- failures ---------------------------------------------------------------------------------

    def _store(self):
        if max(self.size, self.processes) == 1:
            return None
        return dist.distributed_c10d._get_default_store()

    def _start_heartbeat(self) -> None:
        store = self._store()
        if store is None:
            return

        def beat() -> None:
            while not self._stop.wait(_BEAT):
                try:
                    store.set(f"autopar/heartbeat/{self.rank}", repr(time.time()))
                except Exception:  # noqa: BLE001 - the store's owner is gone: nothing to report to
                    return

        store.set(f"autopar/heartbeat/{self.rank}", repr(time.time()))
        self._heart = threading.Thread(target=beat, name="autopar-heartbeat", daemon=True)
        self._heart.start()

    def silent_ranks(self, older_than: float = 4 * _BEAT) -> list[int]:
        """Ranks whose heartbeat is older than `older_than` seconds (or that never beat)."""
        store = self._store()
        if store is None:
            return []
        now, silent = time.time(), []
        for r in range(max(self.size, self.processes)):
            try:
                last = float(store.get(f"autopar/heartbeat/{r}").decode()) if store.check(
                    [f"autopar/heartbeat/{r}"]) else 0.0
            except Exception:  # noqa: BLE001 - an unreachable store says as much as a silent rank
                return [r for r in range(max(self.size, self.processes)) if r != self.rank]
            if now - last > older_than:
                silent.append(r)
        return silent

    def failure(self, doing: str, error: BaseException) -> RankFailure:
        time.sleep(4 * _BEAT)  # let a dying rank's heartbeat go stale before reading them
        silent = [r for r in self.silent_ranks() if r != self.rank]
        who = f"rank(s) {', '.join(map(str, silent))} stopped" if silent else "a collective failed"
        return RankFailure(f"rank {self.rank}: {who} while {doing}: {type(error).__name__}: "
                           f"{str(error).splitlines()[0] if str(error) else ''}")

    def close(self) -> None:
        self._stop.set()


def this_device() -> torch.device:
    """Where this process computes: its GPU when CUDA is available and the world (if any) runs over
    NCCL, else the CPU (a gloo world runs on CPUs whatever the machine has)."""
    initialized = dist.is_available() and dist.is_initialized()
    if torch.cuda.is_available() and (not initialized or dist.get_backend() == "nccl"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cpu")


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
