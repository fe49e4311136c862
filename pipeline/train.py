"""DVC stage `train`: fit the VAE, keep models/best.ckpt, open the pipeline's MLflow run."""

import mlflow

from mnist_vae import tracking
from mnist_vae.config import PARAMS_FILE, cli, load_config
from mnist_vae.data import VaeDataModule, read_source
from mnist_vae.files import write_json
from mnist_vae.train import fit


def main() -> None:
    cfg = load_config()
    data = VaeDataModule(cfg.data, cfg.train)
    data.setup()  # reads and verifies the data before a run is opened
    with tracking.pipeline_run(cfg) as run:
        tracking.log_data_source(read_source(), context="training")
        mlflow.log_artifact(str(PARAMS_FILE))
        result = fit(cfg, data, run.info.run_id)
        mlflow.log_metrics(result.summary())
        mlflow.log_artifact(str(result.best_checkpoint), "checkpoints")
    write_json("metrics/train.json", result.summary())


if __name__ == "__main__":
    with cli():
        main()
