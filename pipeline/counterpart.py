"""DVC stage `counterpart`: the same MLPs trained as the other kind (the plain AE for a VAE or
an IWAE, the VAE for an AE), as a child of the pipeline's MLflow run, for the side-by-side figure."""

from mnist_vae.entry import run

import dataclasses
import shutil

import mlflow

from mnist_vae import liveness, served, tracking
from mnist_vae.checkpoints import portable_checkpoint_bytes
from mnist_vae.config import load_config
from mnist_vae.files import check_folders, published
from mnist_vae.lit import VaeDataModule
from mnist_vae.paths import Paths
from mnist_vae.train import fit


def main() -> None:
    paths = Paths.of()
    cfg = load_config(paths.params)
    other = "vae" if cfg.model.kind == "ae" else "ae"
    # On one device whatever train.devices says: a DDP launch would rerun this script per rank,
    # each opening a child run; the baseline is small and only drawn in a figure.
    train = dataclasses.replace(cfg.train, devices=1, num_nodes=1, strategy="auto")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kind=other), train=train)
    check_folders(paths.counterpart, paths.counterpart_checkpoints)
    data = VaeDataModule(cfg.data, cfg.train, paths.data)
    data.setup()
    with published() as outputs, tracking.continue_run(paths.run_file) as parent:
        with mlflow.start_run(experiment_id=parent.info.experiment_id, nested=True,
                              parent_run_id=parent.info.run_id, run_name=f"{other}-counterpart",
                              tags=liveness.process_tags()) as run, tracking.killed_if_stopped():
            mlflow.log_params(tracking.run_params(cfg))
            result = fit(cfg, data, run.info.run_id, work_dir=paths.counterpart_checkpoints)
            model = served.log_model(result.best_checkpoint, other, data.splits["val"][0][:5].cpu().numpy())
            tracking.log_results(result.summary(), model_id=model.model_id)
        for name in ("best.ckpt", "last.ckpt"):
            outputs.write(paths.counterpart / name, portable_checkpoint_bytes(paths.counterpart_checkpoints / name))
    shutil.rmtree(paths.counterpart_checkpoints)


if __name__ == "__main__":
    run(main)
