"""DVC stage `train`: fit the VAE into models/, in the pipeline's MLflow run; resumes a killed run."""

from mnist_vae.entry import run

from mnist_vae.config import load_config
from mnist_vae.paths import Paths
from mnist_vae.train_stage import train_stage


def main() -> None:
    paths = Paths.of()
    cfg = load_config(paths.params)
    train_stage(cfg, paths)


if __name__ == "__main__":
    run(main)
