"""`fit()`: the one training path, shared by the train stage, the counterpart, the sweep and the
benchmark; and `train_stage()`, the train stage with its resume after a crash.

Checkpoints are written to a work folder outside DVC's outputs (DVC deletes outputs before it
reruns a stage), so a killed training resumes from its last epoch; models/ and the history CSV
receive the result only once training has finished.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import mlflow
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

from . import tracking
from .config import Config
from .download import DataSource
from .files import atomic_path, write_bytes, write_json
from .lit import LitVAE, VaeDataModule
from .paths import Paths

log = logging.getLogger(__name__)

RESUME_FILE = "resume.json"


@dataclass
class FitResult:
    best_checkpoint: Path
    history: list[dict[str, float]]  # one row per epoch: epoch, train_loss, val_* metrics
    monitor: str = "val_neg_elbo"  # what "best" means: val_recon for the AE

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
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(self.rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        write_bytes(path, text.getvalue().encode())


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
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        mlflow.log_metrics(metrics, step=trainer.current_epoch, run_id=self.run_id)
        # A sign of life that any machine can read: tracking.close_dead_runs.
        mlflow.MlflowClient().set_tag(self.run_id, tracking.HEARTBEAT_TAG, str(int(time.time())))


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
    trainer = L.Trainer(max_epochs=cfg.train.max_epochs, accelerator=cfg.train.accelerator,
                        devices=1, logger=False, callbacks=all_callbacks,
                        enable_progress_bar=show_bar, enable_model_summary=False)
    trainer.fit(module, datamodule=data, ckpt_path=resume_from)
    result = FitResult(Path(best.best_model_path), history.rows, module.monitor)
    if models_dir is not None:
        for name in ("best.ckpt", "last.ckpt"):
            with atomic_path(Path(models_dir) / name) as tmp:
                shutil.copyfile(Path(work_dir) / name, tmp)
        result.best_checkpoint = Path(models_dir) / "best.ckpt"
    if history_file is not None:
        history.write_csv(history_file)
    return result


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
    try:
        state = json.loads((work_dir / RESUME_FILE).read_text())
        checkpoint = work_dir / "last.ckpt"
        epoch = torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"]
    except (OSError, ValueError, KeyError, RuntimeError, EOFError):
        return None
    if state["fingerprint"] != fingerprint:
        log.info("an interrupted training in %s had other params or data: starting fresh", work_dir)
        return None
    return Interrupted(state["run_id"], checkpoint, epoch)


def train_stage(cfg: Config, paths: Paths) -> FitResult:
    """Fit into paths.models within a new pipeline MLflow run, or resume the interrupted
    training of this same config and data in its own run. The run file, models/, the history
    and metrics/train.json are written together at the end, so they always name one run."""
    data = VaeDataModule(cfg.data, cfg.train, paths.data)
    data.setup()  # reads and verifies the data before a run is opened
    source = DataSource.read(paths.data)
    key = fingerprint(cfg, source)
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
        result = fit(cfg, data, run.info.run_id, work_dir=paths.checkpoints, models_dir=paths.models,
                     history_file=paths.history, resume_from=interrupted and interrupted.checkpoint)
        mlflow.log_metrics(result.summary())
        mlflow.log_artifact(str(result.best_checkpoint), "checkpoints")
        tracking.write_run_file(paths.run_file, run.info.run_id)
    write_json(paths.metrics / "train.json", result.summary())
    shutil.rmtree(paths.checkpoints)  # finished: nothing left to resume
    return result
