"""A script's whole life, from its first import to its exit. Every script imports `run` from
here before anything else (pyproject.toml's isort sections keep it first; tests/test_layout.py
checks): importing this module makes a stop signal end the process at once, with one line, while
the script's other imports load (torch and MLflow take seconds), until `command()` takes the
signals over. Nothing else imports it: a notebook keeps its own handlers."""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

from .process import STOP_SIGNALS, command, on_stop_signals, program


def _stopped_while_starting(signum: int, frame: object) -> None:
    # Nothing has begun, so nothing needs unwinding; raising here would print a traceback from
    # deep inside torch's import.
    os.write(2, f"{program()} stopped by {signal.Signals(signum).name} while starting, before any "
                "work; rerun it\n".encode())
    os._exit(128 + signum)


on_stop_signals(_stopped_while_starting)


def run(main: Callable[[], object]) -> NoReturn:
    """What every script's `if __name__ == "__main__":` calls: `main()` in `command()`, then the
    end of the process, at once, with its exit status."""
    try:
        with command():
            main()
    except SystemExit as done:
        end_process(done.code)
    end_process(0)


def end_process(code: int | str | None) -> NoReturn:
    """End the process now that its work is over, done, failed or stopped. A stop signal is
    ignored from here on: nothing is left to abandon, and Python's own exit sets the default
    handlers back before it spends 1.5-2.5 s tearing torch's and MLflow's modules down, so a
    SIGTERM in those seconds killed the process with no line, after it had published its outputs
    (and DVC then failed the stage). That teardown is skipped; what Python's exit does before it
    is done here: the threads joined, the exit functions (MLflow's, logging's) run, the streams
    flushed."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if isinstance(code, str):  # SystemExit("message"), as Python shows it
        print(code, file=sys.stderr)
        code = 1
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
