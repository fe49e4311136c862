"""`fit()`: the one training path, shared by the train stage, the counterpart, the sweep and the
benchmark, with the callbacks that record each epoch (history, MLflow metrics, progress).

It checkpoints the best and the last epoch into a work folder and publishes nothing: the callers
decide where results go and when (train_stage.py, pipeline/counterpart.py).
"""

from __future__ import annotations

import csv
import io
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import lightning as L
import mlflow
from lightning.pytorch.callbacks import ModelCheckpoint
from mlflow.entities import Metric, RunTag
from tqdm import tqdm

from . import tracking
from .config import Config, TrainConfig
from .lit import LitVAE, VaeDataModule

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


class ImageBar(L.Callback):
    """A bar per epoch counted in images, advanced after every optimizer update: Lightning's own
    counts calls, and at train.steps_per_call 16 an epoch of the offline sample is 2 calls, so
    it sat at 0/2 while the epochs went by. A step hook on the optimizer sees each update,
    whichever loop makes it. The last epoch's val_neg_elbo (val_recon for the AE) rides along,
    to two decimals: three significant digits show 160 for a whole run."""

    def __init__(self, file: TextIO | None = None, mininterval: float = 0.2) -> None:
        self.file, self.mininterval, self.bar, self.shown = file, mininterval, None, ""

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.step_images = module.hparams.batch_size
        self.hook = trainer.optimizers[0].register_step_post_hook(lambda *_: self._advance())

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        images = len(trainer.datamodule.splits["train"][0]) // trainer.world_size
        self.bar = tqdm(total=images, unit="img", unit_scale=True, file=self.file or sys.stderr,
                        desc=f"epoch {trainer.current_epoch}/{trainer.max_epochs - 1}",
                        postfix=self.shown, dynamic_ncols=True, mininterval=self.mininterval)

    def _advance(self) -> None:
        if self.bar is not None:  # the last batch of an epoch may be short: the bar ends at its total
            self.bar.update(min(self.step_images, self.bar.total - self.bar.n))

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.bar is None:
            return
        self.shown = f"{module.monitor} {float(trainer.callback_metrics[module.monitor]):.2f}"
        self.bar.set_postfix_str(self.shown, refresh=False)
        self.bar.close()
        self.bar = None

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.hook.remove()
        if self.bar is not None:
            self.bar.close()


class Summary(L.Callback):
    """One closing line: epochs, time, images/s and the best epoch, on a terminal or in a log."""

    def __init__(self, history: History, monitor: str) -> None:
        self.history, self.monitor = history, monitor

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.started, self.first_epoch = time.perf_counter(), trainer.current_epoch

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        epochs = trainer.current_epoch - self.first_epoch
        if not trainer.is_global_zero or not self.history.rows or epochs < 1:
            return
        seconds = time.perf_counter() - self.started
        images = epochs * len(trainer.datamodule.splits["train"][0])
        best = min(self.history.rows, key=lambda row: row[self.monitor])
        log.info("trained %d epochs in %.1f s (%s images/s); best epoch %d: %s %.2f", epochs, seconds,
                 f"{images / seconds:,.0f}", best["epoch"], self.monitor, best[self.monitor])


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
    all_callbacks: list[L.Callback] = [best, last, history]
    if run_id is not None:
        all_callbacks.append(EpochMetricsLogger(run_id, module.monitor))
    if progress:
        all_callbacks += [ImageBar() if sys.stderr.isatty() else EpochLines(),
                          Summary(history, module.monitor)]
    all_callbacks += callbacks  # last: a pruning callback may stop the epoch after it is logged
    trainer = L.Trainer(max_epochs=cfg.train.max_epochs, logger=False, callbacks=all_callbacks,
                        enable_progress_bar=False, enable_model_summary=False,
                        **_devices(cfg.train))
    trainer.fit(module, datamodule=data, ckpt_path=resume_from)
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
