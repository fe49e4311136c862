"""DVC stage `figures`: the tutorial's figures and training curves under figures/, logged to MLflow."""

import csv
from pathlib import Path

import mlflow

from mnist_vae import tracking
from mnist_vae.config import cli, load_config
from mnist_vae.data import load_split, read_source
from mnist_vae.evaluate import load_vae
from mnist_vae.figures import FIGURES_DIR, draw_all
from mnist_vae.train import HISTORY_FILE, MODELS_DIR


def main() -> None:
    cfg = load_config()
    images, labels = load_split("test")
    vae = load_vae(MODELS_DIR / "best.ckpt")
    counterpart = load_vae(Path("counterpart/best.ckpt"))
    with HISTORY_FILE.open() as f:
        history = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    with tracking.continue_run():
        for path in draw_all(vae, images, labels, history, read_source()["dataset"], cfg.figures,
                             FIGURES_DIR, counterpart):
            mlflow.log_artifact(str(path), "figures")


if __name__ == "__main__":
    with cli():
        main()
