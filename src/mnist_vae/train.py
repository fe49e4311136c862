"""`fit()`: the one training path, shared by the train stage, the sweep and the benchmark.

Checkpoints are written to a work folder outside DVC's outputs (DVC deletes outputs before it
reruns a stage), so a killed training resumes from its last epoch; models/ receives best.ckpt and
last.ckpt only once training has finished.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

from .config import Config
from .data import VaeDataModule
from .files import write_bytes, write_json
from .model import LitVAE
from .tracking import EpochMetricsLogger

log = logging.getLogger(__name__)

MODELS_DIR = Path("models")
WORK_DIR = Path("checkpoints")  # git-ignored and no DVC output: survives a crash and a rerun
HISTORY_FILE = Path("metrics/train_history.csv")
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
    """Keeps each epoch's metrics; rewrites `path` (a CSV for `dvc plots show`) after each epoch."""

    def __init__(self, path: Path | None) -> None:
        self.path, self.rows = path, []

    # Saved in every checkpoint, so a resumed training keeps the epochs before the crash.
    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.rows = state["rows"]

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
        work_dir: Path = WORK_DIR, models_dir: Path | None = MODELS_DIR,
        history_file: Path | None = HISTORY_FILE, resume_from: Path | None = None,
        callbacks: Sequence[L.Callback] = (), enable_progress_bar: bool = True) -> FitResult:
    """Train a VAE (or the AE) as cfg says, checkpointing best (lowest val_neg_elbo, val_recon for
    the AE) and last epochs in
    work_dir, then moving them to models_dir; log each epoch to the MLflow run `run_id` if given.
    `resume_from`: a last.ckpt of an interrupted fit of the same config and data."""
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    # `import lightning` sets this; on a CUDA build without a GPU it makes every optimizer step
    # query NVML (~43 us) instead of using the cached answer.
    os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")  # in-memory batches need none
    warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")  # Lightning's, not ours
    warnings.filterwarnings("ignore", "Checkpoint directory .* exists and is not empty")  # resume.json

    module = LitVAE.from_config(cfg.model, cfg.train)
    best = ModelCheckpoint(dirpath=work_dir, filename="best", monitor=module.monitor, mode="min",
                           enable_version_counter=False)
    # Not save_last=True: Lightning 2.6 writes that copy only in epochs that improve the best.
    last = ModelCheckpoint(dirpath=work_dir, filename="last", enable_version_counter=False)
    history = History(history_file)
    all_callbacks: list[L.Callback] = [best, last, history]
    if run_id is not None:
        all_callbacks.append(EpochMetricsLogger(run_id))
    if enable_progress_bar:
        all_callbacks.append(TQDMProgressBar(refresh_rate=10))
    all_callbacks += callbacks  # last: a pruning callback may stop the epoch after it is logged
    trainer = L.Trainer(max_epochs=cfg.train.max_epochs, accelerator=cfg.train.accelerator,
                        devices=1, logger=False, callbacks=all_callbacks,
                        enable_progress_bar=enable_progress_bar, enable_model_summary=enable_progress_bar)
    trainer.fit(module, datamodule=data, ckpt_path=resume_from)
    if models_dir is None:
        return FitResult(Path(best.best_model_path), history.rows, module.monitor)
    models_dir.mkdir(parents=True, exist_ok=True)
    for name in ("best.ckpt", "last.ckpt"):
        shutil.copyfile(work_dir / name, models_dir / f".{name}.tmp")
        os.replace(models_dir / f".{name}.tmp", models_dir / name)
    return FitResult(models_dir / "best.ckpt", history.rows, module.monitor)


# ---------------------------------------------------------------------------------------------
# Resuming the train stage after a crash

def fingerprint(cfg: Config, source: dict) -> str:
    """What a training depends on: a resume is only right if none of it changed."""
    params = {k: v for k, v in cfg.flat().items()
              if k.startswith(("model.", "train.")) or k in ("data.val_fraction", "data.seed", "data.binarize")}
    blob = json.dumps([params, source["sha256_decompressed"]], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Interrupted:
    run_id: str
    checkpoint: Path
    epoch: int  # the last epoch it finished


def find_interrupted(fingerprint: str, work_dir: Path = WORK_DIR) -> Interrupted | None:
    """The training that a crash cut short, if it trained this very config on this data."""
    try:
        state = json.loads((work_dir / RESUME_FILE).read_text())
        checkpoint = work_dir / "last.ckpt"
        epoch = torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"]
    except (OSError, ValueError, KeyError, RuntimeError):
        return None
    if state["fingerprint"] != fingerprint:
        log.info("an interrupted training in %s had other params or data: starting fresh", work_dir)
        return None
    return Interrupted(state["run_id"], checkpoint, epoch)


def start_work_dir(run_id: str, fingerprint: str, work_dir: Path = WORK_DIR) -> None:
    shutil.rmtree(work_dir, ignore_errors=True)
    write_json(work_dir / RESUME_FILE, {"run_id": run_id, "fingerprint": fingerprint})
