"""autopar's own errors, and which error a mistake raises. Each message says what was found and
what was required.

- `ValueError`: a wrong value. In a plan, cluster or profile file the message starts with the field's
  path (`plan.stages[0].params['w1.weight'].storage[0]: found S(2), required ...`), after the file's
  name when read with `load`; in an argument, with the argument's name (`time_limit: found 0, ...`).
- `TypeError`: an argument of the wrong type (a path where a `Plan` goes, a name where a `Cluster`).
- `CaptureError`: a model torch.export cannot trace; `InfeasibleError`: no plan fits, with the numbers.
- `OSError`: a file that cannot be read or written (missing, a directory, no space).
The command line (`autopar.cli`) prints any of them as one line and exits with 2.
"""

from __future__ import annotations


class AutoparError(Exception):
    """Base of every error autopar raises on purpose."""


class CaptureError(AutoparError):
    """The model could not be captured as a graph: names the op, the source line and the module path."""

    def __init__(self, message: str, *, op: str | None = None, source: str | None = None,
                 module_path: str | None = None) -> None:
        super().__init__(message)
        self.op = op
        self.source = source
        self.module_path = module_path


class InfeasibleError(AutoparError):
    """No plan fits: carries the minimum memory per device any plan needs and what a device has."""

    def __init__(self, message: str, *, required_bytes: float | None = None,
                 available_bytes: float | None = None) -> None:
        super().__init__(message)
        self.required_bytes = required_bytes
        self.available_bytes = available_bytes
