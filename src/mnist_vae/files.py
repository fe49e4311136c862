"""Atomic writes: every output appears whole or not at all, so a crash never leaves a file that
looks complete (DVC would cache it, the next stage would trust it). `published()` does the same
for several files that name one result together (a run file and the models it ran)."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _temp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    # Created with mode 0666, which the umask trims as for any ordinary output (mkstemp's 0600 would not).
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    return tmp


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def write_json(path: Path | str, obj: Any) -> None:
    write_bytes(path, json_bytes(obj))


class Outputs:
    """What `published()` yields: `write` puts a file's bytes beside its place at once, so a full
    disk fails the work that makes them, not the rename."""

    def __init__(self) -> None:
        self.staged: list[tuple[Path, Path]] = []  # (temp file, its place)

    def write(self, path: Path | str, data: bytes) -> None:
        tmp = _temp_beside(Path(path))
        self.staged.append((tmp, Path(path)))
        tmp.write_bytes(data)


@contextmanager
def published() -> Iterator[Outputs]:
    """Files renamed into place together, in the order written, once the block succeeds; none of
    them if it fails."""
    outputs = Outputs()
    try:
        yield outputs
        for tmp, path in outputs.staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in outputs.staged:
            tmp.unlink(missing_ok=True)
