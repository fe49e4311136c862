"""Which MLflow runs are alive: the tags that name the process holding a run open, with its
heartbeat, and closing the runs a dead process left RUNNING (any stage does it as it starts)."""

from __future__ import annotations

import logging
import os
import socket
import time

import mlflow

log = logging.getLogger("mnist_vae.tracking")  # the name its lines had in tracking.py

HEARTBEAT_TAG = "process.heartbeat"  # unix seconds, set when a run opens and after every epoch
# A RUNNING run whose heartbeat is older than this is a dead machine's: ten epochs of full MNIST
# on a slow CPU, or an evaluate stage, take less.
DEAD_AFTER_S = 15 * 60


def process_tags() -> dict[str, str]:
    """Who holds the run open: lets a later start tell a crashed run from a live one."""
    tags = {"process.host": socket.gethostname(), "process.pid": str(os.getpid()),
            HEARTBEAT_TAG: str(int(time.time()))}
    if exp_name := os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = exp_name
    return tags


def close_dead_runs(experiment: str) -> None:
    """Mark KILLED the runs left RUNNING by a dead process: one of this host that no longer
    exists, or one on any machine whose heartbeat is older than DEAD_AFTER_S."""
    client = mlflow.MlflowClient()
    now = time.time()
    for run in client.search_runs([experiment], "attributes.status = 'RUNNING'"):
        tags = run.data.tags
        dead_here = tags.get("process.host") == socket.gethostname() and not _alive(int(tags.get("process.pid", 0)))
        silent_s = now - float(tags.get(HEARTBEAT_TAG, now))
        if dead_here or silent_s > DEAD_AFTER_S:
            client.set_terminated(run.info.run_id, status="KILLED")
            why = "a dead process" if dead_here else \
                f"{tags.get('process.host', 'a machine')}, silent for {silent_s / 60:.0f} min"
            log.warning("MLflow run %s was left RUNNING by %s: marked KILLED", run.info.run_id, why)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return pid > 0
