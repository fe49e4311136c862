"""`python -m mnist_vae evaluate --checkpoint CKPT --images FILE`: score any checkpoint (or, with
`--model URI`, any model the pipeline logged to MLflow) on any IDX image file; the last line of
stdout is one JSON object of the metrics.

`python -m mnist_vae relocate`: after the project was moved or copied, point its MLflow store's
records (absolute artifact paths) at the mlruns/ it is now in."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from . import stores
from .config import MAX_IWAE_SAMPLES
from .entry import run
from .errors import ArgumentParser, PipelineError
from .idx import read_idx
from .paths import Paths
from .process import command, set_up_torch

if TYPE_CHECKING:
    from .model import VAE


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m mnist_vae")
    commands = parser.add_subparsers(dest="command", required=True)
    ev = commands.add_parser("evaluate", help="test metrics of a checkpoint on an IDX image file")
    model = ev.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", type=Path, help="e.g. models/best.ckpt")
    model.add_argument("--model", metavar="URI", help="a logged model: models:/mnist-vae@champion, "
                       "models:/mnist-vae/3 or runs:/<run id>/model, from the project's MLflow store")
    ev.add_argument("--images", type=Path, required=True, help="IDX images, .gz or raw, 28x28 uint8")
    ev.add_argument("--iwae-samples", type=int, default=100,
                    help=f"k of the IWAE bound, 1..{MAX_IWAE_SAMPLES:,} (default 100)")
    ev.add_argument("--batch-size", type=int, default=500)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--binarize", action="store_true",
                    help="score stochastically binarized images (seeded), as data.binarize: dynamic")
    commands.add_parser("relocate", help="after moving or copying the project, point its MLflow "
                        "store at the mlruns/ folder it is now in")
    args = parser.parse_args(argv)
    if args.command == "relocate":
        with command():
            relocate_store()
        return
    if not 1 <= args.iwae_samples <= MAX_IWAE_SAMPLES:
        ev.error(f"--iwae-samples {args.iwae_samples}: expected an integer from 1 to {MAX_IWAE_SAMPLES:,}")
    if args.batch_size < 1:
        ev.error(f"--batch-size {args.batch_size}: expected an integer >= 1")
    if not 0 <= args.seed < 2**63:
        ev.error(f"--seed {args.seed}: expected an integer from 0 to 2**63 - 1")

    with command():
        evaluate_images(args)


def evaluate_images(args: argparse.Namespace) -> None:
    # Imported here: torch takes seconds to import, and `relocate` does not need it.
    import torch

    from .checkpoints import load_vae
    from .data import binarize
    from .evaluate import evaluate

    set_up_torch()  # command() set up a process without torch: its threads, as a stage's

    # The images first: a bad file is named before a model is loaded (seconds for --model).
    images = read_idx(args.images)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) == 0:
        raise PipelineError(f"{args.images}: images of shape {images.shape}; expected (N, 28, 28) "
                            "with N >= 1, an IDX image file such as data/t10k-images-idx3-ubyte.gz")
    vae = load_vae(args.checkpoint) if args.checkpoint else load_model(args.model)
    flat = torch.from_numpy(images.reshape(len(images), -1).copy())
    if args.binarize:
        flat = binarize(flat, torch.Generator().manual_seed(args.seed))
    metrics = evaluate(vae, flat, args.iwae_samples, args.batch_size, args.seed)
    print(json.dumps(metrics))


def load_model(uri: str) -> VAE:
    # Imported here: MLflow takes seconds to import, and --checkpoint does not need it.
    import mlflow

    from . import served, tracking

    store = tracking.tracking_uri()
    mlruns = Paths.of().mlruns
    if store == tracking.default_tracking_uri():
        if not (mlruns / "mlflow.db").exists():
            raise PipelineError(f"--model {uri}: no MLflow store at {mlruns}; run `dvc repro` "
                                "in the project first, or set MLFLOW_TRACKING_URI to the store")
        stores.check_store_location(mlruns / "mlflow.db", mlruns / "artifacts")
    stores.check_tracking_uri(store)
    mlflow.set_tracking_uri(store)
    return served.load(uri).vae


def relocate_store() -> None:
    """Rewrite the project's MLflow store's recorded paths to where mlruns/ is now."""
    mlruns = Paths.of().mlruns
    rewritten = stores.relocate(mlruns)
    if rewritten:
        print(f"{mlruns / 'mlflow.db'}: rewrote {rewritten} recorded path(s) to {mlruns} (each "
              "table.column above); new runs and registered models now use its artifacts/")
    else:
        print(f"{mlruns / 'mlflow.db'}: already records its artifacts in {mlruns / 'artifacts'}; nothing to rewrite")


if __name__ == "__main__":
    run(main)
