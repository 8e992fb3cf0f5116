"""autopar's own errors. Each message says what was found and what was required."""

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
