"""DVC stage `evaluate`: test-set -ELBO, its terms, the IWAE bound, posterior collapse, sample
quality and a latent probe, into metrics/evaluate.json and the pipeline's MLflow run."""

import logging
from pathlib import Path

import mlflow
import torch

from mnist_vae import tracking
from mnist_vae.config import cli, load_config
from mnist_vae.data import binarize, load_split, read_source
from mnist_vae.evaluate import collapse_warning, evaluate, load_vae
from mnist_vae.files import write_json
from mnist_vae.quality import latent_probe_accuracy, load_classifier, sample_quality
from mnist_vae.train import MODELS_DIR


def main() -> None:
    cfg = load_config()
    train, (images, labels) = load_split("train"), load_split("test")
    classifier = load_classifier(Path("classifier/classifier.pt"))
    vae = load_vae(MODELS_DIR / "best.ckpt")
    if cfg.data.binarize == "dynamic":  # the IWAE paper's setting: one seeded binarization
        images = binarize(images, torch.Generator().manual_seed(cfg.evaluate.seed))
    with tracking.continue_run():
        tracking.log_data_source(read_source(), context="testing")
        metrics = evaluate(vae, images, cfg.evaluate.iwae_samples, cfg.evaluate.batch_size,
                           cfg.evaluate.seed)
        metrics |= sample_quality(vae, classifier, images, labels, cfg.evaluate.n_samples,
                                  cfg.evaluate.seed)
        metrics["latent_probe_accuracy"] = latent_probe_accuracy(vae, train, (images, labels))
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
