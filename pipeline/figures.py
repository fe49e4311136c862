"""DVC stage `figures`: the tutorial's figures and training curves under figures/, logged to MLflow."""

from mnist_vae.entry import run

import csv

import mlflow

from mnist_vae import tracking
from mnist_vae.checkpoints import load_vae
from mnist_vae.config import load_config
from mnist_vae.data import load_split
from mnist_vae.idx import DataSource
from mnist_vae.paths import Paths


def main() -> None:
    paths = Paths.of()
    cfg = load_config(paths.params)
    images, labels = load_split("test", paths.data)
    vae = load_vae(paths.models / "best.ckpt")
    counterpart = load_vae(paths.counterpart / "best.ckpt")
    with paths.history.open() as f:
        history = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    # matplotlib (0.3 s to import) once the inputs have loaded: a missing one fails sooner.
    from mnist_vae.figures import draw_all

    with tracking.continue_run(paths.run_file):
        for path in draw_all(vae, images, labels, history, DataSource.read(paths.data).dataset,
                             cfg.figures, paths.figures, counterpart):
            mlflow.log_artifact(str(path), "figures")


if __name__ == "__main__":
    run(main)
