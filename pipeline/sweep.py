"""Optuna sweep over model.latent_dim, kl_weight and hidden_dims: `python pipeline/sweep.py`.

Reads the `sweep:` section of params.yaml; each of its keys is also a flag (--n-trials 4,
--hidden-dims '[[128], [256, 128]]'). Fetches the data through the download stage if missing.
`--objective rate_distortion` minimises val_kl and val_recon together (no pruning) and writes the
Pareto front to sweeps/pareto_front.csv beside sweeps/best_params.yaml.
"""

from mnist_vae.entry import run

import argparse
import dataclasses
import subprocess

import yaml

from mnist_vae.config import SweepConfig, load_config
from mnist_vae.errors import ArgumentParser
from mnist_vae.idx import SOURCE_FILE
from mnist_vae.paths import Paths
from mnist_vae.study import check_storage, check_sweepable
from mnist_vae.sweep import run_sweep


def parse_overrides(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(SweepConfig):
        # YAML parsing gives flags the same types as params.yaml; config validation checks them.
        # Only the flags given: `--seed null` (or '') is null, not absent.
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=yaml.safe_load,
                            dest=field.name, metavar="VALUE", help=f"overrides sweep.{field.name}",
                            default=argparse.SUPPRESS)
    return {f"sweep.{k}": v for k, v in vars(parser.parse_args(argv)).items()}


def main(argv: list[str] | None = None) -> None:
    paths = Paths.of()
    overrides = parse_overrides(argv)
    cfg = load_config(paths.params, overrides=overrides)
    check_sweepable(cfg, paths.params.name)
    # A bad URL or a missing driver: one line, before any download.
    check_storage(cfg.sweep.storage, "--storage" if "sweep.storage" in overrides else
                  f"{paths.params.name}: sweep.storage =")
    if not (paths.data / SOURCE_FILE).exists():
        subprocess.run(["dvc", "repro", "download"], cwd=paths.root, check=True)
    run_sweep(cfg)


if __name__ == "__main__":
    run(main)
