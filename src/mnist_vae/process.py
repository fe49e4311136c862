"""The process around every entry point (a stage, the sweep and its workers, the CLI): the
environment, warning filters, logging and torch's threads, set once; and `command()`, which shows
every error a user can fix as one line with exit status 2 instead of a traceback, and a stop by a
signal as one line. A script's start and end: entry.py."""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import PipelineError, Stopped, one_line


def set_up_process() -> None:
    """Environment, warning filters and logging for a command or a spawned sweep worker."""
    # Like DVC's analytics (off in .dvc/config): no phoning home from offline machines.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MPLBACKEND", "Agg")  # files only; no display on CI or servers
    # MLflow retries a request 7 times with exponential backoff (~4 minutes) before it gives up on a
    # dead tracking server; 3 tries, 1 s apart, 10 s each, say so within ~30 s.
    for key, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                       ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")):
        os.environ.setdefault(key, value)
    # `import lightning` sets this (the stage has imported it by now); on a CUDA build without a
    # GPU it makes every optimizer step query NVML (~43 us) instead of using the cached answer.
    os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
    # In-memory batches need no DataLoader workers; the others are Lightning's own, not ours.
    # Optuna calls heartbeats ("Argument heartbeat_interval is an experimental feature"),
    # fail_stale_trials and its matplotlib plots experimental: we use them on purpose.
    # Under DDP LitVAE sums its epoch metrics across ranks itself, so Lightning's advice to
    # log with sync_dist (a mean of per-rank means) is not for us.
    for message in (".*does not have many workers.*", ".*isinstance.treespec, LeafSpec.*",
                    "Checkpoint directory .* exists and is not empty", ".* is experimental .*",
                    ".* is an experimental feature.*",
                    # Optuna's slice plot of a parameter every trial so far shares.
                    "Attempting to set identical low and high xlims",
                    ".*when logging on epoch level in distributed setting.*"):
        warnings.filterwarnings("ignore", message)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("mnist_vae").setLevel(logging.INFO)
    # Lightning's banner ("GPU available: False", "TPU available", tips): not what a user needs.
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # MLflow logs the traceback of a SQLite error (a full disk) and then raises it again: the
    # raised one reaches command(), as one line for a full disk or its traceback for anything else.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    # urllib3's "Retrying (Retry(total=1 ...)) after connection broken" before a dead tracking
    # server's one line.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    # MLflow's notes on its own workings (the system-metrics thread starting and stopping, that a
    # pyfunc is cloudpickled, where the registry found the logged model) and its download bar.
    for name in ("mlflow.system_metrics", "mlflow.pyfunc", "mlflow.models",
                 "mlflow.tracking._model_registry"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


# Torch's float sums depend on how many threads split them, and its default is every core, so
# the same seed trained other weights on another machine. At a fixed count the weights repeat bit
# for bit (seen across two machines and two torch versions); 4 threads step as fast as 16 here.
TORCH_THREADS = 4
MAX_THREADS = 1024


def set_up_torch(threads: int | None = None) -> None:
    """Before any computing (torch's worker threads take the calling thread's float settings when
    the first parallel op makes them): subnormal floats flushed to zero, and `threads` intra-op
    threads, or for a stage a fixed count unless OMP_NUM_THREADS names one."""
    torch = sys.modules.get("torch")  # the stages that compute have imported it; download has not
    if torch is None:
        return
    # Adam's first moments of weights that stop getting gradients (pixels that are 0, ReLUs that
    # are off) decay through the subnormal range, where x86 takes up to ~100x longer per operation:
    # at the end of the default training 30% of the first layer's were subnormal. Flushed to zero,
    # as TensorFlow does by default: the default fit() ~10% faster, the same best val_neg_elbo.
    torch.set_flush_denormal(True)
    omp = os.environ.get("OMP_NUM_THREADS")
    if threads is not None:
        torch.set_num_threads(threads)
    elif omp is None:
        torch.set_num_threads(min(TORCH_THREADS, os.cpu_count() or 1))
    elif not (omp.isdigit() and 1 <= int(omp) <= MAX_THREADS):  # torch would quietly use every core
        raise PipelineError(f"OMP_NUM_THREADS = {omp!r}: expected a thread count from 1 to "
                            f"{MAX_THREADS:,}; set one, or unset it for the fixed {TORCH_THREADS} "
                            "at which results repeat")


# A scheduler's, `timeout`'s and docker's; Ctrl-C; a closed terminal or ssh session.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# What the process was started ignoring stays ignored: nohup's SIGHUP, a background job's SIGINT.
IGNORED_AT_START = frozenset(s for s in STOP_SIGNALS if signal.getsignal(s) == signal.SIG_IGN)


def on_stop_signals(handler: Callable[[int, object], None]) -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN if signum in IGNORED_AT_START else handler)


def stop_on_signals() -> None:
    """SIGTERM, SIGINT and SIGHUP raise `Stopped` in the main thread, once: a second signal while the
    first unwinds (closing the MLflow run, marking the trial) is ignored, so the clean-up runs to
    its end. fit() installs these again as each training starts, in place of Lightning's own.
    Python's own SIGTERM ends the process with nothing cleaned up, and Lightning's turns it into
    an exit with status 0."""

    def stop(signum: int, frame: object) -> None:
        global _stopping
        if not _stopping:
            _stopping = True
            raise Stopped(signum)

    global _stopping
    _stopping = False
    on_stop_signals(stop)


_stopping = False


def stopping() -> bool:
    """Whether a stop signal has come: what fails from here on is the stop's doing."""
    return _stopping


@contextmanager
def command() -> Iterator[None]:
    """Run an entry point's body: set up the process, then show a user's error as one line, and
    a stop by a signal as one line with the signal's exit status."""
    set_up_process()
    stop_on_signals()
    try:
        set_up_torch()
        yield
    except Stopped as stop:
        line = stop.line if stop.line is not None else (
            f"{program()} stopped by {stop.name}; nothing it was writing was kept, rerun it (or "
            "dvc repro) to go on")
        if line:  # "": a DDP rank besides 0, whose stop rank 0 reports
            print(line, file=sys.stderr)
        raise SystemExit(stop.exit_status) from None
    except Exception as err:
        if (line := one_line(err)) is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2) from None


def program() -> str:
    script = Path(sys.argv[0])
    return "python -m mnist_vae" if script.name == "__main__.py" else f"python pipeline/{script.name}"
