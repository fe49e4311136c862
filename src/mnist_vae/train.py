"""`fit()`: the one training path, shared by the train stage, the counterpart, the sweep and the
benchmark, with the callbacks that record each epoch (history, MLflow metrics, random state) and
stop it on a signal; progress.py holds what it shows while it runs.

It checkpoints the best and the last epoch into a work folder and publishes nothing: the callers
decide where results go and when (train_stage.py, pipeline/counterpart.py).
"""

from __future__ import annotations

import csv
import io
import logging
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import mlflow
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from mlflow.entities import Metric, RunTag

from . import liveness, tracking
from .config import Config, TrainConfig
from .errors import Stopped
from .lit import LitVAE, VaeDataModule
from .process import STOP_SIGNALS, stop_on_signals
from .progress import EpochLines, ImageBar, Summary

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    work_dir: Path  # holds best.ckpt and last.ckpt
    history: list[dict[str, float]]  # one row per epoch: epoch, train_loss, val_* metrics
    monitor: str = "val_neg_elbo"  # what "best" means: val_recon for the AE

    @property
    def best_checkpoint(self) -> Path:
        return self.work_dir / "best.ckpt"

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


class RandomState(L.Callback):
    """torch's global generators (the reparameterisation noise, dynamic binarization) in every
    checkpoint, and set again when a fit resumes, so a resumed training draws the numbers the
    uninterrupted one would: reseeding would make it another training. The batch order needs
    nothing: each epoch's is seeded by train.seed + epoch (data.ShuffledBatches). Lightning
    restores callbacks before it makes the first epoch's batches, and its sanity check saves
    and restores the generators around itself."""

    def state_dict(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state:
            torch.cuda.set_rng_state_all(state["cuda"])


class SignalsStopRankZero(L.Callback):
    """Our signal handlers in place of Lightning's for the fit. Lightning's SIGTERM handler
    broadcasts from inside the handler under DDP (a deadlock when the ranks are in another
    collective) and lets the fit end with exit status 0. Here rank 0 stops (`Stopped`, and
    Lightning's KeyboardInterrupt path then kills the ranks it started); the other ranks ignore
    stop signals and end with it."""

    def on_sanity_check_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._install(trainer)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._install(trainer)

    @staticmethod
    def _install(trainer: L.Trainer) -> None:
        if trainer.global_rank == 0:
            stop_on_signals()
        else:
            for signum in STOP_SIGNALS:
                signal.signal(signum, signal.SIG_IGN)


def history_csv(rows: list[dict[str, float]]) -> bytes:
    """The history as metrics/train_history.csv holds it: a row per epoch, the plots' source."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
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
        metrics = [Metric(k, tracking.metric_value(v), now_ms, trainer.current_epoch)
                   for k, v in trainer.callback_metrics.items()]
        # With a sign of life that any machine can read (liveness.close_dead_runs): one write.
        heartbeat = RunTag(liveness.HEARTBEAT_TAG, str(now_ms // 1000))
        mlflow.MlflowClient().log_batch(self.run_id, metrics=metrics, tags=[heartbeat])


def fit(cfg: Config, data: VaeDataModule, run_id: str | None = None, *, work_dir: Path,
        resume_from: Path | None = None, callbacks: Sequence[L.Callback] = (),
        progress: bool = True) -> FitResult:
    """Train a VAE (or the AE) as cfg says, checkpointing the best epoch (lowest val_neg_elbo,
    val_recon for the AE) and the last in work_dir. Logs each epoch to the MLflow run `run_id`,
    if given.
    `resume_from`: a last.ckpt of an interrupted fit of the same config and data.
    progress: a bar on a terminal, one line per epoch otherwise; False for silence."""
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    module = LitVAE.from_config(cfg.model, cfg.train)
    best = ModelCheckpoint(dirpath=work_dir, filename="best", monitor=module.monitor, mode="min",
                           enable_version_counter=False)
    # Not save_last=True: Lightning 2.6 writes that copy only in epochs that improve the best.
    last = ModelCheckpoint(dirpath=work_dir, filename="last", enable_version_counter=False)
    history = History()
    all_callbacks: list[L.Callback] = [best, last, history, RandomState(), SignalsStopRankZero()]
    if run_id is not None:
        all_callbacks.append(EpochMetricsLogger(run_id, module.monitor))
    if progress:
        all_callbacks += [ImageBar() if sys.stderr.isatty() else EpochLines(),
                          Summary(history, module.monitor)]
    all_callbacks += callbacks  # last: a pruning callback may stop the epoch after it is logged
    trainer = L.Trainer(max_epochs=cfg.train.max_epochs, logger=False, callbacks=all_callbacks,
                        enable_progress_bar=False, enable_model_summary=False,
                        **_devices(cfg.train))
    try:
        trainer.fit(module, datamodule=data, ckpt_path=resume_from)
    except SystemExit as lightning_exit:
        # Lightning ends a fit that a KeyboardInterrupt stopped with sys.exit(1), after its
        # teardown; the stop itself is what the caller must see.
        if isinstance(lightning_exit.__context__, Stopped):
            raise lightning_exit.__context__ from None
        raise
    return FitResult(Path(work_dir), history.rows, module.monitor)


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
