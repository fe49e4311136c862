"""`fit()`: the one training path, shared by the train stage, the sweep and the benchmark."""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

from .config import Config
from .data import VaeDataModule
from .files import write_bytes
from .model import LitVAE
from .tracking import EpochMetricsLogger

MODELS_DIR = Path("models")
HISTORY_FILE = Path("metrics/train_history.csv")


@dataclass
class FitResult:
    best_checkpoint: Path
    history: list[dict[str, float]]  # one row per epoch: epoch, train_loss, val_* metrics

    @property
    def best(self) -> dict[str, float]:
        return min(self.history, key=lambda row: row["val_neg_elbo"])

    def summary(self) -> dict[str, float]:
        return {"best_val_neg_elbo": self.best["val_neg_elbo"], "best_epoch": self.best["epoch"],
                "epochs": len(self.history)}


class History(L.Callback):
    """Keeps each epoch's metrics; rewrites `path` (a CSV for `dvc plots show`) after each epoch."""

    def __init__(self, path: Path | None) -> None:
        self.path, self.rows = path, []

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.rows.append({"epoch": trainer.current_epoch,
                          **{k: float(v) for k, v in sorted(trainer.callback_metrics.items())}})
        if self.path is not None:
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=list(self.rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows)
            write_bytes(self.path, text.getvalue().encode())


def fit(cfg: Config, data: VaeDataModule, run_id: str | None = None, *,
        models_dir: Path = MODELS_DIR, history_file: Path | None = HISTORY_FILE,
        callbacks: Sequence[L.Callback] = (), enable_progress_bar: bool = True) -> FitResult:
    """Train a VAE as cfg says; keep best.ckpt (lowest val_neg_elbo) and last.ckpt in models_dir;
    log each epoch to the MLflow run `run_id` when given."""
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    # `import lightning` sets this; on a CUDA build without a GPU it makes every optimizer step
    # query NVML (~43 us) instead of using the cached answer.
    os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")  # in-memory batches need none
    warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")  # Lightning's, not ours
    warnings.filterwarnings("ignore", "Checkpoint directory .* exists and is not empty")  # run file

    checkpoint = ModelCheckpoint(dirpath=models_dir, filename="best", monitor="val_neg_elbo",
                                 mode="min", save_last=True, enable_version_counter=False)
    history = History(history_file)
    all_callbacks: list[L.Callback] = [checkpoint, history]
    if run_id is not None:
        all_callbacks.append(EpochMetricsLogger(run_id))
    if enable_progress_bar:
        all_callbacks.append(TQDMProgressBar(refresh_rate=10))
    all_callbacks += callbacks  # last: a pruning callback may stop the epoch after it is logged
    trainer = L.Trainer(max_epochs=cfg.train.max_epochs, accelerator=cfg.train.accelerator,
                        devices=1, logger=False, callbacks=all_callbacks,
                        enable_progress_bar=enable_progress_bar, enable_model_summary=enable_progress_bar)
    trainer.fit(LitVAE.from_config(cfg.model, cfg.train), datamodule=data)
    return FitResult(Path(checkpoint.best_model_path), history.rows)
