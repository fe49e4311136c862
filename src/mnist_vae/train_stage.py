"""The train stage: one training per checkout, resumed after a crash, published once finished.

Checkpoints are written to a work folder outside DVC's outputs (DVC deletes outputs before it
reruns a stage), so a killed training resumes from its last epoch; models/, the history and the
run file receive the result together, only once the MLflow run has ended FINISHED.

With train.devices > 1 Lightning's DDP reruns the stage script once per extra rank; those ranks
train their share and return from `train_stage()` before anything is opened or written.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

from . import served, tracking
from .checkpoints import UnsafeCheckpointError, load_checkpoint, portable_checkpoint_bytes
from .config import Config, ConfigError
from .errors import PipelineError, Stopped
from .files import check_folders, json_bytes, published, read_json_file, write_json
from .idx import DataSource
from .lit import VaeDataModule
from .paths import Paths
from .snapshots import EpochImages
from .train import FitResult, fit, global_rank, history_csv

log = logging.getLogger(__name__)

RESUME_FILE = "resume.json"


def fingerprint(cfg: Config, source: DataSource) -> str:
    """What a training depends on: a resume is only right if none of it changed."""
    params = {k: v for k, v in cfg.flat().items()
              if k.startswith(("model.", "train.")) or k in ("data.val_fraction", "data.seed", "data.binarize")}
    blob = json.dumps([params, source.sha256_decompressed], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Interrupted:
    run_id: str
    checkpoint: Path
    epoch: int  # the last epoch it finished


def find_interrupted(fingerprint: str, work_dir: Path) -> Interrupted | None:
    """The training that a crash cut short, if it trained this very config on this data."""
    checkpoint = work_dir / "last.ckpt"
    try:
        state = read_json_file(work_dir / RESUME_FILE, "the resume record",
                               {"run_id": str, "fingerprint": str})
        epoch = load_checkpoint(checkpoint, keys=("epoch",))["epoch"]
    except UnsafeCheckpointError:
        raise PipelineError(f"{checkpoint}: refused to resume from it, it holds pickled code (this "
                            f"pipeline never writes that); delete {work_dir} to train from scratch") from None
    except (OSError, ValueError, PipelineError):
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint or "run_id" not in state:
        log.info("an interrupted training in %s had other params or data: starting fresh", work_dir)
        return None
    return Interrupted(state["run_id"], checkpoint, epoch)


@contextmanager
def training_lock(lock_file: Path) -> Iterator[None]:
    """One training per checkout. flock, not a pid file: the kernel releases it when its holder
    dies however it dies, so a killed training never blocks the next one and a live one is never
    taken over. The file holds who owns it, for the error message."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process"
            raise PipelineError(f"another training is running in this checkout ({owner}, holding "
                                f"{lock_file}); wait for it to end or stop it, then rerun") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}".encode(), 0)
        yield
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def clear_work_folder(folder: Path) -> None:
    """Delete a work folder; if it is a link (to a bigger disk, say), what it holds instead. A
    link to anything but a folder was refused before the run opened (check_folders)."""
    if not folder.is_symlink():
        shutil.rmtree(folder, ignore_errors=True)
        return
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def stopped_line(stop: Stopped, checkpoints: Path, max_epochs: int) -> str:
    try:
        done = load_checkpoint(checkpoints / "last.ckpt", keys=("epoch",))["epoch"] + 1
    except PipelineError:  # stopped in its first epoch
        done = 0
    return (f"training stopped by {stop.name} after {done} of {max_epochs} epochs; rerun dvc repro "
            "(or python pipeline/train.py) to resume from there")


def check_accelerator(name: str) -> None:
    """Before a run opens: Lightning finds a missing GPU only once the Trainer is built."""
    available = {"cuda": CUDAAccelerator.is_available(), "mps": MPSAccelerator.is_available()}
    available["gpu"] = available["cuda"] or available["mps"]
    if not available.get(name, True):
        raise ConfigError(f"params.yaml: train.accelerator = {name!r}, but this machine has no "
                          "such device; set train.accelerator: auto (or cpu)")


def train_stage(cfg: Config, paths: Paths) -> FitResult:
    """Fit within a new pipeline MLflow run, or resume the interrupted training of this same
    config and data in its own run. models/, the history, metrics/train.json and the run file
    are published together once the run has ended FINISHED, so they always name one run; a
    failed training changes none of them."""
    check_accelerator(cfg.train.accelerator)
    check_folders(paths.models, paths.metrics, paths.checkpoints)
    tracking.check_store()
    data = VaeDataModule(cfg.data, cfg.train, paths.data)
    data.setup()  # reads and verifies the data before a run is opened
    source = DataSource.read(paths.data)
    key = fingerprint(cfg, source)
    if global_rank(cfg.train) != 0:
        # A DDP rank besides 0: it trains its share beside rank 0 (resuming from the same
        # checkpoint), and takes no lock, opens no run and writes nothing; rank 0 does all that.
        interrupted = find_interrupted(key, paths.checkpoints)
        try:
            return fit(cfg, data, work_dir=paths.checkpoints, progress=False,
                       resume_from=interrupted and interrupted.checkpoint)
        except Stopped as stop:
            stop.line = ""  # rank 0 says it
            raise
    with training_lock(paths.train_lock), published() as outputs:
        interrupted = find_interrupted(key, paths.checkpoints)
        if interrupted and not tracking.has_run(interrupted.run_id):
            log.info("the interrupted training in %s belongs to MLflow run %s, which is not in the "
                     "store %s (MLFLOW_TRACKING_URI changed, or mlruns/ replaced): starting fresh",
                     paths.checkpoints, interrupted.run_id, tracking.tracking_uri())
            interrupted = None
        with tracking.pipeline_run(cfg, resume_run_id=interrupted and interrupted.run_id) as run:
            if interrupted:
                log.info("resuming MLflow run %s after epoch %d", run.info.run_id, interrupted.epoch)
                mlflow.set_tag("resumed_from_epoch", interrupted.epoch)
            else:
                clear_work_folder(paths.checkpoints)
                write_json(paths.checkpoints / RESUME_FILE, {"run_id": run.info.run_id, "fingerprint": key})
                tracking.log_data_source(source, context="training")
                mlflow.log_artifact(str(paths.params))
            every = cfg.train.images_every_epochs
            try:
                result = fit(cfg, data, run.info.run_id, work_dir=paths.checkpoints,
                             resume_from=interrupted and interrupted.checkpoint,
                             callbacks=[EpochImages(run.info.run_id, every)] if every else [])
            except Stopped as stop:
                stop.line = stopped_line(stop, paths.checkpoints, cfg.train.max_epochs)
                raise
            mlflow.log_artifact(str(result.best_checkpoint), "checkpoints")
            model = served.log_model(result.best_checkpoint, cfg.model.kind, data.splits["val"][0][:5].cpu().numpy())
            tracking.log_results(result.summary(), model_id=model.model_id)
            # Written beside their places now (a full disk fails here, the run FAILED), renamed
            # into place once the run has ended FINISHED; the run file last.
            for name in ("best.ckpt", "last.ckpt"):
                outputs.write(paths.models / name, portable_checkpoint_bytes(paths.checkpoints / name))
            outputs.write(paths.history, history_csv(result.history))
            outputs.write(paths.metrics / "train.json", json_bytes(result.summary()))
            outputs.write(paths.run_file, json_bytes({"run_id": run.info.run_id,
                                                      "tracking_uri": tracking.recorded_tracking_uri()}))
            mlflow.set_tag(tracking.TRAINING_FINISHED_TAG, "true")
    clear_work_folder(paths.checkpoints)  # finished: nothing left to resume
    return FitResult(paths.models, result.history, result.monitor)
