"""DVC stage `evaluate`: test-set -ELBO, its terms, the IWAE bound, posterior collapse, sample
quality and a latent probe, into metrics/evaluate.json and the pipeline's MLflow run."""

from mnist_vae.entry import run

import logging

import mlflow
import torch

from mnist_vae import registry, tracking
from mnist_vae.checkpoints import load_vae
from mnist_vae.config import load_config
from mnist_vae.data import binarize, load_split
from mnist_vae.evaluate import collapse_warning, evaluate, format_metrics, per_image_nats
from mnist_vae.files import write_json
from mnist_vae.idx import DataSource
from mnist_vae.paths import Paths
from mnist_vae.quality import latent_probe_accuracy, load_classifier, sample_quality

log = logging.getLogger("mnist_vae.pipeline")


def main() -> None:
    paths = Paths.of()
    cfg = load_config(paths.params)
    train, (images, labels) = load_split("train", paths.data), load_split("test", paths.data)
    classifier = load_classifier(paths.classifier)
    vae = load_vae(paths.models / "best.ckpt")
    if cfg.data.binarize == "dynamic":  # the IWAE paper's setting: one seeded binarization
        images = binarize(images, torch.Generator().manual_seed(cfg.evaluate.seed))
    source = DataSource.read(paths.data)
    with tracking.continue_run(paths.run_file) as run:
        tracking.log_data_source(source, context="testing")
        metrics = evaluate(vae, images, cfg.evaluate.iwae_samples, cfg.evaluate.batch_size,
                           cfg.evaluate.seed)
        metrics |= sample_quality(vae, classifier, images, labels, cfg.evaluate.n_samples,
                                  cfg.evaluate.seed)
        metrics["latent_probe_accuracy"] = latent_probe_accuracy(vae, train, (images, labels))
        mlflow.set_tag("data.binarize", cfg.data.binarize)
        # Here, where the test images are loaded: the registry scores the champion on them too.
        def score(model):
            return per_image_nats(model, images, cfg.evaluate.iwae_samples, cfg.evaluate.batch_size,
                                  cfg.evaluate.seed)

        version = registry.register(run.info.run_id, cfg.model.kind, source.digest, cfg.data.binarize,
                                    metrics, score, vae, cfg.evaluate.champion_min_z,
                                    paths.champion_lock)
        tracking.log_results(metrics, model_id=version.model_id)
        if warning := collapse_warning(metrics):
            log.warning("WARNING: %s", warning)
            mlflow.set_tag("posterior_collapse", "true")
        write_json(paths.metrics / "evaluate.json", metrics)
    log.info("%s", format_metrics(metrics))


if __name__ == "__main__":
    run(main)
