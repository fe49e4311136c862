"""The Model Registry: each evaluated run's model as a version of `mnist-vae` (the IWAE's too;
`mnist-ae` for the AE), tagged with its model.kind and what it was measured on, and the alias
`champion`, which moves only on evidence.

A new version takes `champion` only if it beats the champion per test image: both are scored on
the same images (same digest and binarization, same k and seed of the IWAE bound), and the mean
per-image gain over its standard error must exceed evaluate.champion_min_z. Across five seeds the
default's test IWAE bound spans ~3 nats, so a plain comparison of the means moved the alias on
seed noise. The decision is made under a lock, so evaluations that finish together (queued
experiments) judge one after another, each against the champion the previous one left.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from filelock import FileLock

from .checkpoints import load_vae
from .model import VAE
from .served import MODEL_NAME

log = logging.getLogger(__name__)

REGISTERED = {"vae": "mnist-vae", "iwae": "mnist-vae", "ae": "mnist-ae"}  # the IWAE is a VAE
CHAMPION = "champion"
# What "better" means per kind: the test metric the evaluate stage measured, lower is better;
# the gate compares the same quantity per image (evaluate.per_image_nats).
RANK_METRIC = {"vae": "test_iwae_nll", "iwae": "test_iwae_nll", "ae": "test_recon"}


@dataclass(frozen=True)
class Verdict:
    moves: bool
    line: str  # for the log and the version's tags
    tags: dict[str, str]


def paired_verdict(champion: torch.Tensor, challenger: torch.Tensor, version: str,
                   champion_version: str, min_z: float) -> Verdict:
    """The paired test on per-image nats (lower is better) of the same images: the gain is the
    champion's minus the challenger's, its standard error the spread of the per-image gains over
    the square root of their count."""
    gains = champion.double() - challenger.double()
    gain = gains.mean().item()
    se = (gains.std() / math.sqrt(len(gains))).item() if len(gains) > 1 else math.inf
    z = gain / se if se > 0 else (math.inf if gain > 0 else 0.0)
    gain_text = (f"{abs(gain):.2f} +- {se:.2f} nats per image {'better' if gain >= 0 else 'worse'} "
                 f"than version {champion_version}")
    moves = z > min_z
    if moves:
        line = f"champion moves to version {version}: {gain_text} (z = {z:.1f} > {min_z:.1f})"
    else:
        why = ", not significant" if gain >= 0 else ""
        line = f"champion stays: version {version} is {gain_text}{why} (z = {z:.1f} <= {min_z:.1f})"
    tags = {"champion.gain_nats": f"{gain:.4f}", "champion.gain_se": f"{se:.4f}",
            "champion.z": f"{z:.2f}", "champion.compared_with": champion_version,
            "champion.verdict": line}
    return Verdict(moves, line, tags)


def register(run_id: str, kind: str, data_digest: str, binarize: str, metrics: dict[str, float],
             score: Callable[[VAE], torch.Tensor], vae: VAE, min_z: float,
             lock_file: Path) -> mlflow.entities.model_registry.ModelVersion:
    """Register the run's model as a new version (once per run: a rerun of evaluate updates its
    tags), and move `champion` to it if the paired test says it beats the champion measured on
    the same data and binarization. `score` gives a model's per-image nats on the test images;
    `vae` is this run's model, scored only when there is a champion to compare it with."""
    client = mlflow.MlflowClient()
    name, metric = REGISTERED[kind], RANK_METRIC[kind]
    tags = {"data.digest": data_digest, "data.binarize": binarize, "model.kind": kind,
            metric: str(metrics[metric])}
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        version = existing[0]
        for key, value in tags.items():
            client.set_model_version_tag(name, version.version, key, value)
    else:
        version = mlflow.register_model(f"runs:/{run_id}/{MODEL_NAME}", name, tags=tags)
    with FileLock(lock_file):  # read the champion, judge, move: nothing in between
        verdict = _judge(client, name, str(version.version), tags, score, vae, min_z)
        for key, value in verdict.tags.items():
            client.set_model_version_tag(name, version.version, key, value)
        if verdict.moves:
            client.set_registered_model_alias(name, CHAMPION, version.version)
    log.info("%s version %s registered; %s", name, version.version, verdict.line)
    return version


def _judge(client: mlflow.MlflowClient, name: str, version: str, tags: dict[str, str],
           score: Callable[[VAE], torch.Tensor], vae: VAE, min_z: float) -> Verdict:
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:  # no champion yet
        return Verdict(True, f"champion moves to version {version}: the first", {})
    if str(champion.version) == version:  # the client gives it as int or str
        return Verdict(True, f"version {version} stays the champion", {})
    for key in ("data.digest", "data.binarize"):
        if champion.tags.get(key) != tags[key]:
            return Verdict(False, f"champion stays: version {champion.version} was measured on other "
                           f"data ({key} {champion.tags.get(key)}, version {version} {tags[key]}): "
                           "they do not compare", {})
    champion_scores = score(logged_weights(f"models:/{name}/{champion.version}"))
    return paired_verdict(champion_scores, score(vae), version, str(champion.version), min_z)


def logged_weights(model_uri: str) -> VAE:
    """A logged model's VAE from its checkpoint artifact alone, loaded with weights_only: the
    gate runs none of the logged model's code, so it judges a version that older code logged as
    a pickle (which served.load refuses) as safely as one logged as code."""
    with tempfile.TemporaryDirectory() as folder:
        local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=folder))
        (checkpoint,) = (local / "artifacts").glob("*.ckpt")  # the one log_model was given
        return load_vae(checkpoint)
