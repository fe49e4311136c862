"""DVC stage `evaluate`: test-set -ELBO, its terms and the IWAE bound into metrics/evaluate.json."""

import logging

import mlflow
import torch

from mnist_vae import tracking
from mnist_vae.config import cli, load_config
from mnist_vae.data import binarize, load_split, read_source
from mnist_vae.evaluate import collapse_warning, evaluate, load_vae
from mnist_vae.files import write_json
from mnist_vae.train import MODELS_DIR


def main() -> None:
    cfg = load_config()
    images, _ = load_split("test")
    if cfg.data.binarize == "dynamic":  # the IWAE paper's setting: one seeded binarization
        images = binarize(images, torch.Generator().manual_seed(cfg.evaluate.seed))
    vae = load_vae(MODELS_DIR / "best.ckpt")
    with tracking.continue_run():
        tracking.log_data_source(read_source(), context="testing")
        metrics = evaluate(vae, images, cfg.evaluate.iwae_samples, cfg.evaluate.batch_size,
                           cfg.evaluate.seed)
        mlflow.log_metrics(metrics)
        mlflow.set_tag("data.binarize", cfg.data.binarize)
        if warning := collapse_warning(metrics):
            logging.getLogger("mnist_vae.pipeline").warning("WARNING: %s", warning)
            mlflow.set_tag("posterior_collapse", "true")
        write_json("metrics/evaluate.json", metrics)
    print(metrics)


if __name__ == "__main__":
    with cli():
        main()
