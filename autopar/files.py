"""Reading and writing autopar's files (plans, clusters): JSON in, JSON out, nothing else.

Takes file text and gives plain data (dicts, lists, str, int, float, bool, None), which the
dataclass readers (`autopar.serialize`, `Cluster.from_dict`) then check field by field. Nothing read
is executed or unpickled. Writes are atomic: a temporary file in the same directory, then
`os.replace`, so a reader sees the old file or the new one, and a failed write leaves neither a
partial file nor a temporary one behind.

    >>> parse_json('{"nodes": 2}', "cluster file")
    {'nodes': 2}
    >>> parse_json('{"nodes": 2, "nodes": 3}', "cluster file")
    Traceback (most recent call last):
    ...
    ValueError: cluster file: found the key 'nodes' twice in one object, required each key once
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any


def parse_json(text: str, what: str) -> Any:
    """Strict JSON to data; anything else is a `ValueError` saying which file it was meant to be.

    Refused beyond the JSON grammar: NaN and Infinity (not JSON, though Python writes them), a key
    repeated in one object (the last would silently win), and nesting too deep to read.
    """
    if not isinstance(text, str):
        raise TypeError(f"{what}: found {type(text).__name__}, required JSON text (str)")
    try:
        return json.loads(text, parse_constant=_no_constant(what), object_pairs_hook=_unique_keys(what))
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: found malformed JSON ({e}), required a JSON object") from e
    except RecursionError:
        raise ValueError(f"{what}: found JSON nested too deeply to read, required a plan or cluster "
                         f"file's few levels") from None


def read_json(path: str | os.PathLike, what: str) -> Any:
    """The data of the JSON file at `path` (`parse_json`); errors name `what` and the file. An
    `OSError` when it cannot be read, a `ValueError` when its bytes are not UTF-8 JSON text."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path}: found bytes that are not UTF-8 ({e.reason} at byte {e.start}), required "
                         f"JSON text") from None
    return parse_json(text, f"{what} {path}")


def _no_constant(what: str):
    def refuse(name: str) -> Any:
        raise ValueError(f"{what}: found the constant {name}, required a JSON number (JSON has no NaN or "
                         f"Infinity; autopar writes the strings \"inf\" and \"nan\" where a field allows them)")
    return refuse


def _unique_keys(what: str):
    def build(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ValueError(f"{what}: found the key {key!r} twice in one object, required each key once")
            out[key] = value
        return out
    return build


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` whole or not at all: an existing file stays as it was on failure.
    The new file gets the usual permissions (0o666 less the umask), as `open(path, "w")` gives."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
