"""Formatting of bytes, FLOPs, counts and seconds for humans (decimal units, as the seeds use)."""

from __future__ import annotations


def _scaled(value: float, units: tuple[str, ...], digits: int = 3, sep: str = " ") -> str:
    for unit in units[:-1]:
        if abs(value) < 1000:
            return f"{value:.{digits}g}{sep}{unit}".rstrip()
        value /= 1000
    return f"{value:.{digits}g}{sep}{units[-1]}"


def fmt_bytes(n: float) -> str:
    """Decimal: 350e9 bytes is "350 GB", as in the seeds' memory analysis."""
    return _scaled(n, ("B", "kB", "MB", "GB", "TB", "PB"))


def fmt_flops(n: float) -> str:
    return _scaled(n, ("FLOP", "kFLOP", "MFLOP", "GFLOP", "TFLOP", "PFLOP", "EFLOP"))


def fmt_count(n: float) -> str:
    return _scaled(n, ("", "K", "M", "B", "T"), digits=4, sep="")


def fmt_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.3g} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    if s < 3600:
        return f"{s:.3g} s"
    if s < 86400 * 2:
        return f"{s / 3600:.3g} h"
    return f"{s / 86400:.3g} days"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table: the header row, its rule, then one line per row of cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
