"""DVC stage `download`: the dataset into data/ as IDX files, plus data/source.json."""

from mnist_vae.entry import run

import logging

from mnist_vae.config import load_config
from mnist_vae.download import download
from mnist_vae.paths import Paths


def main() -> None:
    paths = Paths.of()
    cfg = load_config(paths.params)
    info = download(cfg.data, paths.data)
    logging.getLogger("mnist_vae.pipeline").info(
        "%s from %s: %d train, %d test images", info.dataset, info.origin,
        info.n_images["train"], info.n_images["test"])


if __name__ == "__main__":
    run(main)
