"""Atomic writes: every output appears whole or not at all, so a crash never leaves a file that
looks complete (DVC would cache it, the next stage would trust it). `published()` does the same
for several files that name one result together (a run file and the models it ran).

Bounded reads: every file the pipeline reads is a regular file no bigger than its format allows,
checked before a byte is read, so a FIFO never blocks and /dev/zero never fills the memory.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Union, get_args, get_origin


def check_folders(*folders: Path) -> None:
    """Before the work that fills them: each is a folder, a link to one, or not there yet (made
    when first written). A file or a dangling link in its place would fail only once the work is
    done; NotADirectoryError names it, and errors.py the fix."""
    for folder in folders:
        if folder.is_symlink() and not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"a link to {os.readlink(folder)}, which is "
                                     "not a folder", str(folder))
        if folder.exists() and not folder.is_dir():
            mode = folder.stat().st_mode
            kind = "a file" if stat.S_ISREG(mode) else file_kind(mode)
            raise NotADirectoryError(errno.ENOTDIR, f"{kind}, not a folder", str(folder))


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


class FileRefusedError(ValueError):
    """A file refused before or while reading it: missing, not a regular file, bigger than its
    format allows, or not the JSON expected. `reason` is the line without the path; callers add
    the fix (this module knows no project errors: tests/test_layout.py)."""

    def __init__(self, path: Path | str, reason: str, missing: bool = False) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason, self.missing = Path(path), reason, missing


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    """What an st_mode is, in words, for a message."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _check_regular(path: Path, st: os.stat_result, max_bytes: int, what: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise FileRefusedError(path, f"{file_kind(st.st_mode)}, not a regular file; expected {what}")
    if st.st_size > max_bytes:
        raise FileRefusedError(path, f"{st.st_size:,} bytes, more than the {max_bytes:,} that {what} "
                                     "can take; pass the right file")


@contextmanager
def open_bounded(path: Path | str, max_bytes: int, what: str) -> Iterator[IO[bytes]]:
    """`path` opened for reading once it is known to be a regular file of at most `max_bytes`.
    stat() first: opening a FIFO blocks until a writer comes, so it must never be opened; and
    O_NONBLOCK in case one replaced the file in between, checked again with fstat."""
    path = Path(path)
    try:
        _check_regular(path, os.stat(path), max_bytes, what)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileRefusedError(path, f"not found; expected {what}", missing=True) from None
    except OSError as err:
        raise FileRefusedError(path, f"unreadable ({err.strerror}); expected {what}") from None
    with os.fdopen(fd, "rb") as file:
        _check_regular(path, os.fstat(fd), max_bytes, what)
        yield file


def read_bounded(path: Path | str, max_bytes: int, what: str) -> bytes:
    """The bytes of a regular file of at most `max_bytes`; `what` names the file expected, for
    the message ("an IDX file, gzipped or raw"). Never more than max_bytes + 1 are read, so a
    file that grows while it is read is refused too."""
    with open_bounded(path, max_bytes, what) as file:
        try:
            data = file.read(max_bytes + 1)
        except OSError as err:
            raise FileRefusedError(path, f"unreadable ({err.strerror}); expected {what}") from None
    if len(data) > max_bytes:
        raise FileRefusedError(path, f"more than {max_bytes:,} bytes; expected {what}")
    return data


MAX_JSON_BYTES = 2**20  # the pipeline's JSON records (source.json, the run file) are ~1 KB


def read_json_file(path: Path | str, what: str, fields: dict[str, Any],
                   max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """A JSON object with exactly `fields` (name -> type: str, bool, int, float, `str | None`,
    `dict[str, int]`, `list[str]`), each value of its type; a field whose type admits None may be
    missing (read as None). Anything else is one FileRefusedError naming the first wrong key."""
    raw = read_bounded(path, max_bytes, what)
    try:
        data = json.loads(raw)
    except ValueError as err:  # UnicodeDecodeError included
        raise FileRefusedError(path, f"not JSON ({err}); expected {what}") from None
    if not isinstance(data, dict):
        raise FileRefusedError(path, f"a JSON {type(data).__name__}, not an object; expected {what}")
    if unknown := sorted(set(data) - set(fields)):
        raise FileRefusedError(path, f"unknown key {unknown[0]!r}; expected {what} with the keys "
                                     f"{', '.join(fields)}")
    for key, tp in fields.items():
        if key not in data and not _matches(None, tp):
            raise FileRefusedError(path, f"no key {key!r}; expected {what}")
        value = data.setdefault(key, None)
        if not _matches(value, tp):
            shown = json.dumps(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise FileRefusedError(path, f"{key} is {shown}; expected {type_name(tp)} ({what})")
    return data


def _matches(value: Any, tp: Any) -> bool:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if tp is None or tp is type(None):
        return value is None
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1])
                                               for k, v in value.items())
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if tp in (int, float):  # JSON's true is not 1; an integer is a float
        return isinstance(value, (int, float) if tp is float else int) and not isinstance(value, bool)
    return isinstance(value, tp)


_TYPE_NAMES = {str: "a string", bool: "true or false", int: "an integer", float: "a number",
               type(None): "null"}


def type_name(tp: Any) -> str:
    """A type in the words of a message: `str | None` -> "a string or null"."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in args)
    if origin is dict:
        return f"an object mapping {_plural(args[0])} to {_plural(args[1])}"
    if origin is list:
        return f"a list of {_plural(args[0])}"
    return _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _plural(tp: Any) -> str:
    return {str: "strings", int: "integers", float: "numbers", bool: "booleans"}.get(tp, type_name(tp))
