"""What crosses between pipeline stages: the values one stage computes and later ones read
(`crossings`), and this rank's point-to-point messages that carry them and their gradients
(`Messages`, used by `runtime.pipeline`).

A value is made whole at the producer and sent point-to-point, rank i of the consumer's mesh
receiving from rank i mod |producer| of the producer's (`send_recv`); its gradient comes back whole
the same way, summed over consumers. Sends are non-blocking and receives blocking; a message a rank
sends itself (a producer and consumer sharing a rank) goes through a mailbox.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

from autopar.graph import CapturedGraph
from autopar.plan import Plan
from autopar.runtime.world import World


@dataclass(frozen=True, slots=True)
class Crossing:
    """A value computed in one stage and read in later ones."""

    name: str
    producer: int
    consumers: tuple[int, ...]
    index: int
    """Its position among all crossings (message tags)."""
    grad: bool


def crossings(plan: Plan, captured: CapturedGraph) -> list[Crossing]:
    """Every value that leaves its stage, in graph order, with the stages reading it."""
    owner = {n: j for j, s in enumerate(plan.stages) for n in s.nodes if n not in captured.inputs}
    readers: dict[str, set[int]] = defaultdict(set)
    for node in captured.program.graph.nodes:
        j = owner.get(node.name)
        if j is None or node.op != "call_function":
            continue
        for arg in node.all_input_nodes:
            if arg.name in owner and owner[arg.name] != j:
                readers[arg.name].add(j)
    order = [n.name for n in captured.program.graph.nodes if n.name in readers]
    return [Crossing(name=n, producer=owner[n], consumers=tuple(sorted(readers[n])), index=i,
                     grad=captured.nodes[n].requires_grad) for i, n in enumerate(order)]


class Messages:
    """This rank's messages between stages over one step's `m` microbatches, each tagged by
    (crossing, consumer, microbatch, direction)."""

    def __init__(self, plan: Plan, micro: CapturedGraph, links: list[Crossing], world: World, m: int) -> None:
        self.plan, self.micro, self.world, self.m = plan, micro, world, m
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self._by_name = {link.name: link for link in links}
        self._mailbox: dict[int, torch.Tensor] = {}
        self._sends: list = []

    def link(self, name: str) -> Crossing | None:
        """The crossing of the value `name`; None when it stays in its stage."""
        return self._by_name.get(name)

    def _tag(self, link: Crossing, consumer: int, k: int, backward: bool) -> int:
        return ((link.index * len(self.plan.stages) + consumer) * self.m + k) * 2 + int(backward)

    def _post(self, tensor: torch.Tensor, peer: int, tag: int) -> None:
        if peer == self.rank:
            self._mailbox[tag] = tensor
        else:
            self._sends.append((dist.isend(tensor.contiguous(), peer, tag=tag), tensor))

    def _take(self, shape, dtype, peer: int, tag: int, doing: str) -> torch.Tensor:
        if peer == self.rank:
            return self._mailbox.pop(tag)
        buffer = torch.empty(shape, dtype=dtype, device=self.world.device)
        try:
            dist.recv(buffer, peer, tag=tag)
        except (RuntimeError, dist.DistBackendError) as e:
            raise self.world.failure(doing, e) from e
        return buffer

    def send_forward(self, link: Crossing, value: torch.Tensor, k: int) -> None:
        mine = self.plan.stages[link.producer].mesh.devices
        me = mine.index(self.rank)
        for consumer in link.consumers:
            theirs = self.plan.stages[consumer].mesh.devices
            for i, peer in enumerate(theirs):
                if i % len(mine) == me:
                    self._post(value, peer, self._tag(link, consumer, k, False))

    def receive_forward(self, link: Crossing, consumer: int, k: int) -> torch.Tensor:
        mine = self.plan.stages[consumer].mesh.devices
        theirs = self.plan.stages[link.producer].mesh.devices
        meta = self.micro.nodes[link.name].outputs[0]
        value = self._take(meta.shape, meta.dtype, theirs[mine.index(self.rank) % len(theirs)],
                           self._tag(link, consumer, k, False), f"receiving {link.name} from stage {link.producer}")
        return value.requires_grad_(link.grad)

    def send_backward(self, link: Crossing, consumer: int, grad: torch.Tensor, k: int) -> None:
        mine = self.plan.stages[consumer].mesh.devices
        theirs = self.plan.stages[link.producer].mesh.devices
        me = mine.index(self.rank)
        for i, peer in enumerate(theirs):
            if i % len(mine) == me:
                self._post(grad, peer, self._tag(link, consumer, k, True))

    def receive_backward(self, link: Crossing, k: int) -> torch.Tensor:
        mine = self.plan.stages[link.producer].mesh.devices
        meta = self.micro.nodes[link.name].outputs[0]
        total = None
        for consumer in link.consumers:
            theirs = self.plan.stages[consumer].mesh.devices
            grad = self._take(meta.shape, meta.dtype, theirs[mine.index(self.rank) % len(theirs)],
                              self._tag(link, consumer, k, True), f"receiving the gradient of {link.name}")
            total = grad if total is None else total + grad
        return total

    def wait_sends(self) -> None:
        try:
            for work, _ in self._sends:
                work.wait()
        except (RuntimeError, dist.DistBackendError) as e:
            raise self.world.failure("sending to the next stage", e) from e
        self._sends.clear()
