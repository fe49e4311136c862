"""Running as a command: the process-wide set-up, done once in the entry point, and every
`PipelineError` shown as one line with exit status 2 instead of a traceback."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager


class PipelineError(Exception):
    """A problem the user can fix (a param, a data file): shown as one line, no traceback."""


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
    # Optuna calls heartbeats, fail_stale_trials and its matplotlib plots experimental.
    for message in (".*does not have many workers.*", ".*isinstance.treespec, LeafSpec.*",
                    "Checkpoint directory .* exists and is not empty", ".* is experimental .*"):
        warnings.filterwarnings("ignore", message)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("mnist_vae").setLevel(logging.INFO)
    # Lightning's banner ("GPU available: False", "TPU available", tips): not what a user needs.
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextmanager
def cli() -> Iterator[None]:
    set_up_process()
    try:
        yield
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
