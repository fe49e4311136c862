"""DVC stage `classifier`: the MLP that judges samples and reconstructions in `evaluate`."""

from mnist_vae.entry import run

import logging

from mnist_vae.config import load_config
from mnist_vae.data import load_split, to_float
from mnist_vae.files import write_json
from mnist_vae.paths import Paths
from mnist_vae.quality import accuracy, save_classifier, train_classifier


def main() -> None:
    paths = Paths.of()
    cfg = load_config(paths.params)
    train_images, train_labels = load_split("train", paths.data)
    test_images, test_labels = load_split("test", paths.data)
    model = train_classifier(train_images, train_labels, cfg.classifier)
    save_classifier(model, list(cfg.classifier.hidden_dims), paths.classifier)
    metrics = {"classifier_test_accuracy": accuracy(model, to_float(test_images), test_labels)}
    write_json(paths.metrics / "classifier.json", metrics)
    logging.getLogger("mnist_vae.pipeline").info("classifier test accuracy %.4f",
                                                 metrics["classifier_test_accuracy"])


if __name__ == "__main__":
    run(main)
