"""`fit()`: the one training path, shared by the train stage, the counterpart, the sweep and the
benchmark; and `train_stage()`, the train stage with its resume after a crash.

Checkpoints are written to a work folder outside DVC's outputs (DVC deletes outputs before it
reruns a stage), so a killed training resumes from its last epoch; models/ and the history CSV
receive the result only once training has finished.

With train.devices > 1 Lightning's DDP reruns the stage script once per extra rank; those ranks
train their share and return from `train_stage()` before anything is opened or written.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import mlflow
import torch
from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from mlflow.entities import Metric, RunTag

from . import served, tracking
from .cli import PipelineError
from .config import Config, ConfigError, TrainConfig
from .download import DataSource
from .evaluate import UnsafeCheckpointError, load_checkpoint
from .files import atomic_path, torch_bytes, write_bytes, write_json
from .lit import LitVAE, VaeDataModule
from .paths import Paths
from .snapshots import EpochImages

log = logging.getLogger(__name__)

RESUME_FILE = "resume.json"
TRAINING_FINISHED_TAG = tracking.TRAINING_FINISHED_TAG


@dataclass
class FitResult:
    best_checkpoint: Path
    history: list[dict[str, float]]  # one row per epoch: epoch, train_loss, val_* metrics
    monitor: str = "val_neg_elbo"  # what "best" means: val_recon for the AE
    history_csv: bytes = b""  # the history as metrics/train_history.csv holds it

    @property
    def best(self) -> dict[str, float]:
        return min(self.history, key=lambda row: row[self.monitor])

    def summary(self) -> dict[str, float]:
        return {f"best_{self.monitor}": self.best[self.monitor], "best_epoch": self.best["epoch"],
                "epochs": len(self.history)}


class History(L.Callback):
    """Keeps each epoch's metrics, and saves them in every checkpoint, so a resumed training
    keeps the epochs before the crash."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.rows = state["rows"]

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.rows.append({"epoch": trainer.current_epoch,
                              **{k: float(v) for k, v in sorted(trainer.callback_metrics.items())}})

    def write_csv(self, path: Path) -> None:
        write_bytes(path, self.csv_bytes())

    def csv_bytes(self) -> bytes:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(self.rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        return text.getvalue().encode()


class EpochMetricsLogger(L.Callback):
    """Logs every epoch's metrics to an MLflow run with step = epoch, in one batch per epoch."""

    def __init__(self, run_id: str, monitor: str) -> None:
        self.run_id, self.monitor, self.logged_epochs = run_id, monitor, set()

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # A resumed fit may replay the epoch a crash interrupted after it was logged.
        history = mlflow.MlflowClient().get_metric_history(self.run_id, self.monitor)
        self.logged_epochs = {m.step for m in history}

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.current_epoch in self.logged_epochs:
            return
        now_ms = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now_ms, trainer.current_epoch) for k, v in trainer.callback_metrics.items()]
        # With a sign of life that any machine can read (tracking.close_dead_runs): one write.
        heartbeat = RunTag(tracking.HEARTBEAT_TAG, str(now_ms // 1000))
        mlflow.MlflowClient().log_batch(self.run_id, metrics=metrics, tags=[heartbeat])


class EpochLines(L.Callback):
    """One line per epoch, for logs that are files (a progress bar there is ~1,000 lines)."""

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = "  ".join(f"{k} {float(v):.2f}" for k, v in sorted(trainer.callback_metrics.items()))
        log.info("epoch %d/%d  %s  (%.1f s)", trainer.current_epoch, trainer.max_epochs - 1,
                 metrics, time.perf_counter() - self.started)


class ProgressBar(TQDMProgressBar):
    """Lightning's bar with two decimals: its default 3 significant digits show 160.0 for
    every epoch between 159.95 and 160.05, and training looks stalled."""

    def get_metrics(self, trainer: L.Trainer, module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, module)
        metrics.pop("v_num", None)
        return {k: f"{v:.2f}" if isinstance(v, float) else v for k, v in metrics.items()}


def fit(cfg: Config, data: VaeDataModule, run_id: str | None = None, *, work_dir: Path,
        models_dir: Path | None = None, history_file: Path | None = None,
        resume_from: Path | None = None, callbacks: Sequence[L.Callback] = (),
        progress: bool = True) -> FitResult:
    """Train a VAE (or the AE) as cfg says, checkpointing the best epoch (lowest val_neg_elbo,
    val_recon for the AE) and the last in work_dir; then copy them to models_dir and the history
    to history_file, if given. Logs each epoch to the MLflow run `run_id`, if given.
    `resume_from`: a last.ckpt of an interrupted fit of the same config and data.
    progress: a bar on a terminal, one line per epoch otherwise; False for silence."""
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    module = LitVAE.from_config(cfg.model, cfg.train)
    best = ModelCheckpoint(dirpath=work_dir, filename="best", monitor=module.monitor, mode="min",
                           enable_version_counter=False)
    # Not save_last=True: Lightning 2.6 writes that copy only in epochs that improve the best.
    last = ModelCheckpoint(dirpath=work_dir, filename="last", enable_version_counter=False)
    history = History()
    all_callbacks: list[L.Callback] = [best, last, history]
    if run_id is not None:
        all_callbacks.append(EpochMetricsLogger(run_id, module.monitor))
    show_bar = progress and sys.stderr.isatty()
    if show_bar:
        all_callbacks.append(ProgressBar(refresh_rate=10))
    elif progress:
        all_callbacks.append(EpochLines())
    all_callbacks += callbacks  # last: a pruning callback may stop the epoch after it is logged
    trainer = L.Trainer(max_epochs=cfg.train.max_epochs, logger=False, callbacks=all_callbacks,
                        enable_progress_bar=show_bar, enable_model_summary=False,
                        **_devices(cfg.train))
    trainer.fit(module, datamodule=data, ckpt_path=resume_from)
    result = FitResult(Path(best.best_model_path), history.rows, module.monitor)
    if not trainer.is_global_zero:  # under DDP, rank 0 alone writes (Lightning's checkpoints too)
        return result
    result.history_csv = history.csv_bytes()
    if models_dir is not None:
        for name in ("best.ckpt", "last.ckpt"):
            with atomic_path(Path(models_dir) / name) as tmp:
                copy_checkpoint(Path(work_dir) / name, tmp)
        result.best_checkpoint = Path(models_dir) / "best.ckpt"
    if history_file is not None:
        history.write_csv(history_file)
    return result


def copy_checkpoint(src: Path, dst: Path) -> None:
    """A copy that hashes the same in every clone for the same weights (dvc.lock records the
    hash): the callback states name the checkpoint folder by its name alone, not the absolute
    path Lightning records."""
    folder = str(Path(src).parent.resolve())

    def relative(value):
        if isinstance(value, str):
            return value.replace(folder, Path(folder).name)
        if isinstance(value, dict):
            return {relative(k): relative(v) for k, v in value.items()}
        return value

    saved = torch.load(src, map_location="cpu", weights_only=True)
    saved["callbacks"] = relative(saved.get("callbacks", {}))
    Path(dst).write_bytes(torch_bytes(saved))


def _devices(train: TrainConfig) -> dict:
    # use_distributed_sampler=False: VaeDataModule shards its own batches per rank.
    return {"accelerator": train.accelerator, "devices": train.devices,
            "num_nodes": train.num_nodes, "strategy": train.strategy,
            "use_distributed_sampler": False}


def global_rank(train: TrainConfig) -> int:
    """This process's DDP rank, before anything is opened: Lightning's `ddp` reruns the stage
    script for ranks 1..N-1 (with LOCAL_RANK, NODE_RANK set), torchrun and SLURM start every rank
    themselves. Lightning's own reading of that environment, from a Trainer that starts nothing."""
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, **_devices(train))
    return trainer.global_rank


# ---------------------------------------------------------------------------------------------
# The train stage, and resuming it after a crash

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
        state = json.loads((work_dir / RESUME_FILE).read_text())
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


def check_accelerator(name: str) -> None:
    """Before a run opens: Lightning finds a missing GPU only once the Trainer is built."""
    available = {"cuda": CUDAAccelerator.is_available(), "mps": MPSAccelerator.is_available()}
    available["gpu"] = available["cuda"] or available["mps"]
    if not available.get(name, True):
        raise ConfigError(f"params.yaml: train.accelerator = {name!r}, but this machine has no "
                          "such device; set train.accelerator: auto (or cpu)")


def train_stage(cfg: Config, paths: Paths) -> FitResult:
    """Fit into paths.models within a new pipeline MLflow run, or resume the interrupted
    training of this same config and data in its own run. The run file, models/, the history
    and metrics/train.json are published together once the run has ended FINISHED, so they
    always name one run; a failed training changes none of them."""
    check_accelerator(cfg.train.accelerator)
    data = VaeDataModule(cfg.data, cfg.train, paths.data)
    data.setup()  # reads and verifies the data before a run is opened
    source = DataSource.read(paths.data)
    key = fingerprint(cfg, source)
    if global_rank(cfg.train) != 0:
        # A DDP rank besides 0: it trains its share beside rank 0 (resuming from the same
        # checkpoint), and takes no lock, opens no run and writes nothing; rank 0 does all that.
        interrupted = find_interrupted(key, paths.checkpoints)
        return fit(cfg, data, work_dir=paths.checkpoints, progress=False,
                   resume_from=interrupted and interrupted.checkpoint)
    with training_lock(paths.train_lock), ExitStack() as publish:
        interrupted = find_interrupted(key, paths.checkpoints)
        with tracking.pipeline_run(cfg, resume_run_id=interrupted and interrupted.run_id) as run:
            if interrupted:
                log.info("resuming MLflow run %s after epoch %d", run.info.run_id, interrupted.epoch)
                mlflow.set_tag("resumed_from_epoch", interrupted.epoch)
            else:
                shutil.rmtree(paths.checkpoints, ignore_errors=True)
                write_json(paths.checkpoints / RESUME_FILE, {"run_id": run.info.run_id, "fingerprint": key})
                tracking.log_data_source(source, context="training")
                mlflow.log_artifact(str(paths.params))
            every = cfg.train.images_every_epochs
            result = fit(cfg, data, run.info.run_id, work_dir=paths.checkpoints,
                         resume_from=interrupted and interrupted.checkpoint,
                         callbacks=[EpochImages(run.info.run_id, every)] if every else [])
            tracking.log_results(result.summary())
            mlflow.log_artifact(str(result.best_checkpoint), "checkpoints")
            served.log_model(result.best_checkpoint, cfg.model.kind, data.splits["val"][0][:5].cpu().numpy())
            # Every output written beside its place first (a full disk fails here, the run
            # FAILED); renamed into place only after the run has ended FINISHED.
            run_file = {"run_id": run.info.run_id, "tracking_uri": tracking.tracking_uri()}
            staged: dict[Path, bytes | Path] = {  # the run file last to be renamed into place
                paths.run_file: (json.dumps(run_file, indent=2) + "\n").encode(),
                paths.metrics / "train.json": (json.dumps(result.summary(), indent=2) + "\n").encode(),
                paths.history: result.history_csv,
                **{paths.models / name: paths.checkpoints / name for name in ("best.ckpt", "last.ckpt")}}
            for path, content in staged.items():
                tmp = publish.enter_context(atomic_path(path))
                if isinstance(content, Path):
                    copy_checkpoint(content, tmp)
                else:
                    tmp.write_bytes(content)
            mlflow.set_tag(TRAINING_FINISHED_TAG, "true")
        result.best_checkpoint = paths.models / "best.ckpt"
    shutil.rmtree(paths.checkpoints)  # finished: nothing left to resume
    return result
