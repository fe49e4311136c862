"""DVC stage `download`: the dataset into data/ as IDX files, plus data/source.json."""

import logging

from mnist_vae.config import cli, load_config
from mnist_vae.data import DATA_DIR, download

log = logging.getLogger("mnist_vae.pipeline")


def main() -> None:
    cfg = load_config()
    info = download(cfg.data, DATA_DIR)
    log.info("%s from %s: %d train, %d test images", info["dataset"], info["origin"],
                 info["n_images"]["train"], info["n_images"]["test"])


if __name__ == "__main__":
    with cli():
        main()
