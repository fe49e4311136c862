"""Atomic writes: every output appears whole or not at all, so a crash never leaves a file that
looks complete (DVC would cache it, the next stage would trust it)."""

from __future__ import annotations

import io
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    # Created with mode 0666, which the umask trims as for any ordinary output (mkstemp's 0600 would not).
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: Path | str, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def torch_bytes(obj: Any) -> bytes:
    """torch.save's bytes, the same wherever they are written: saved to a path, torch names the
    zip's inner folder after the file (a random temp name here), so equal content hashed unequal."""
    import torch  # here, not at the top: the download stage uses this module without torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
