"""DVC stage `counterpart`: the same MLPs trained as the other kind (the plain AE for a VAE, the
VAE for an AE), as a child of the pipeline's MLflow run, for the side-by-side figure."""

import dataclasses
import shutil
from pathlib import Path

import mlflow

from mnist_vae import tracking
from mnist_vae.config import cli, load_config
from mnist_vae.data import VaeDataModule
from mnist_vae.train import fit

COUNTERPART_DIR = Path("counterpart")
WORK_DIR = Path("checkpoints-counterpart")


def main() -> None:
    cfg = load_config()
    other = "ae" if cfg.model.kind == "vae" else "vae"
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kind=other))
    data = VaeDataModule(cfg.data, cfg.train)
    data.setup()
    with tracking.continue_run() as parent:
        with mlflow.start_run(experiment_id=parent.info.experiment_id, nested=True,
                              parent_run_id=parent.info.run_id, run_name=f"{other}-counterpart",
                              tags=tracking.process_tags()) as run:
            mlflow.log_params(cfg.flat())
            fit(cfg, data, run.info.run_id, work_dir=WORK_DIR, models_dir=COUNTERPART_DIR,
                history_file=None)
    shutil.rmtree(WORK_DIR)


if __name__ == "__main__":
    with cli():
        main()
