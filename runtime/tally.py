"""Counting the collectives a process runs: `Tally` wraps torch.distributed's collective calls for
the length of a `with` block and counts them by kind, blocking and asynchronous apart.

    with Tally() as tally:
        compiled.step(x, target=y)
    tally.blocking["all_reduce"]       # all-reduces this rank waited on where it called them

The plan lists the collectives it expects (`Plan.collectives`); a tally says which ones a step ran,
so the two can be set side by side (`autopar.checks.collective_counts`).
"""

from __future__ import annotations

from collections import Counter

import torch.distributed as dist

KINDS = {
    "all_reduce": "all_reduce", "all_gather_single": "all_gather", "all_gather_into_tensor": "all_gather",
    "reduce_scatter_single": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
    "all_to_all_single": "all_to_all", "broadcast": "broadcast", "send": "send_recv", "recv": "send_recv",
    "isend": "send_recv", "irecv": "send_recv",
}
"""torch.distributed function → the collective kind the cost model names it by."""


class Tally:
    def __init__(self) -> None:
        self.blocking: Counter[str] = Counter()
        self.asynchronous: Counter[str] = Counter()
        self._saved: dict[str, object] = {}

    def __enter__(self) -> Tally:
        for name, kind in KINDS.items():
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._saved[name] = original

            def counted(*args, _original=original, _kind=kind, _name=name, **kwargs):
                asynchronous = kwargs.get("async_op", False) or _name in ("isend", "irecv")
                (self.asynchronous if asynchronous else self.blocking)[_kind] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)
        self._saved.clear()
