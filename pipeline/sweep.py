"""Optuna sweep over model.latent_dim, kl_weight and hidden_dims: `python pipeline/sweep.py`.

Reads the `sweep:` section of params.yaml; each of its keys is also a flag (--n-trials 4,
--hidden-dims '[[128], [256, 128]]'). Fetches the data through the download stage if missing.
"""

import argparse
import dataclasses
import subprocess

import yaml

from mnist_vae.config import PARAMS_FILE, ConfigError, SweepConfig, cli, load_config
from mnist_vae.data import DATA_DIR, SOURCE_FILE
from mnist_vae.sweep import run_sweep


def parse_overrides(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(SweepConfig):
        # YAML parsing gives flags the same types as params.yaml; config validation checks them.
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=yaml.safe_load,
                            dest=field.name, metavar="VALUE", help=f"overrides sweep.{field.name}")
    args = parser.parse_args(argv)
    return {f"sweep.{k}": v for k, v in vars(args).items() if v is not None}


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(PARAMS_FILE, overrides=parse_overrides(argv))
    if cfg.model.kind != "vae":
        raise ConfigError("params.yaml: model.kind = 'ae'; the sweep tunes a VAE (its kl_weight and "
                          "ELBO), set model.kind: vae")
    if not (DATA_DIR / SOURCE_FILE).exists():
        subprocess.run(["dvc", "repro", "download"], check=True)
    run_sweep(cfg)


if __name__ == "__main__":
    with cli():
        main()
