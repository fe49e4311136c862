"""DVC stage `train`: fit the VAE into models/, in the pipeline's MLflow run; resumes a killed run."""

import shutil

import mlflow

from mnist_vae import tracking
from mnist_vae.config import PARAMS_FILE, cli, load_config
from mnist_vae.data import VaeDataModule, read_source
from mnist_vae.files import write_json
from mnist_vae.train import WORK_DIR, find_interrupted, fingerprint, fit, start_work_dir


def main() -> None:
    cfg = load_config()
    data = VaeDataModule(cfg.data, cfg.train)
    data.setup()  # reads and verifies the data before a run is opened
    source = read_source()
    key = fingerprint(cfg, source)
    interrupted = find_interrupted(key)
    with tracking.pipeline_run(cfg, resume_run_id=interrupted and interrupted.run_id) as run:
        if interrupted:
            print(f"Resuming MLflow run {run.info.run_id} after epoch {interrupted.epoch}")
            mlflow.set_tag("resumed_from_epoch", interrupted.epoch)
        else:
            start_work_dir(run.info.run_id, key)
            tracking.log_data_source(source, context="training")
            mlflow.log_artifact(str(PARAMS_FILE))
        result = fit(cfg, data, run.info.run_id, resume_from=interrupted and interrupted.checkpoint)
        mlflow.log_metrics(result.summary())
        mlflow.log_artifact(str(result.best_checkpoint), "checkpoints")
    write_json("metrics/train.json", result.summary())
    shutil.rmtree(WORK_DIR)  # finished: nothing left to resume


if __name__ == "__main__":
    with cli():
        main()
