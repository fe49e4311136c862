"""One-line errors: `PipelineError` for what a user can fix, argparse's errors on one line, and
the outside-world failures (a full disk, a read-only folder) named with their fix."""

from __future__ import annotations

import argparse
import errno
import signal
import sqlite3
from typing import NoReturn


class PipelineError(Exception):
    """A problem the user can fix (a param, a data file): shown as one line, no traceback."""


class Stopped(KeyboardInterrupt):
    """A SIGTERM, SIGINT or SIGHUP, raised where the main thread is (process.stop_on_signals): the
    step in flight is abandoned, every `with` block unwinds, the command exits 128 + the signal's
    number with `line`. A KeyboardInterrupt, so that Optuna marks the trial in flight FAIL and Lightning
    tears its fit down (and stops DDP's other ranks) as it does for Ctrl-C."""

    def __init__(self, signum: int, line: str | None = None) -> None:
        super().__init__(signum)
        self.signum, self.line = signum, line

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # what a shell reports for a process the signal ended: 143, 130, 129


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line, as every other error here: its own puts the usage
    block above them (`--help` still shows it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


# The file-system errors a user fixes outside the code. Every output is written atomically, so
# when one of these stops a stage nothing partial is left and a rerun starts clean.
_NO_SPACE = "free some disk space (or raise the file-size limit) and rerun"
_READ_ONLY = "make it writable for this user and rerun"
# A file or a dangling link where a stage makes its folder (models/, sweeps/, ...).
_NOT_A_FOLDER = "expected a folder there: remove it (the stage makes the folder) or link a folder, then rerun"
OS_ERROR_FIXES = {errno.ENOSPC: _NO_SPACE, errno.EDQUOT: _NO_SPACE, errno.EFBIG: _NO_SPACE,
                  errno.EROFS: _READ_ONLY, errno.EACCES: _READ_ONLY, errno.EPERM: _READ_ONLY,
                  errno.EEXIST: _NOT_A_FOLDER, errno.ENOTDIR: _NOT_A_FOLDER}
# What SQLite says for the same causes, under MLflow's, Optuna's and SQLAlchemy's wrappers.
SQLITE_FIXES = {"disk I/O error": _NO_SPACE, "database or disk is full": _NO_SPACE,
                "attempt to write a readonly database": _READ_ONLY,
                "unable to open database file": "check that its folder exists and is writable, then rerun"}


def one_line(err: BaseException) -> str | None:
    """The line to show for `err`: its message for a PipelineError; for a full disk or a
    read-only folder anywhere in its chain of causes, what failed and the fix; None for anything
    else (a bug: its traceback is what a maintainer needs)."""
    if isinstance(err, PipelineError):
        return str(err)
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and (fix := OS_ERROR_FIXES.get(err.errno)):
            return f"{err.filename or 'writing a file'}: {err.strerror}; {fix}"
        if isinstance(err, sqlite3.Error):
            reason = str(err).splitlines()[0]
            if fix := SQLITE_FIXES.get(reason):
                return f"a SQLite store (mlruns/ or sweeps/) cannot be written: {reason}; {fix}"
        err = err.__cause__ or err.__context__
    return None
