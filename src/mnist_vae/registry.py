"""The Model Registry: each evaluated run's model as a version of `mnist-vae` (`mnist-ae` for the
AE), tagged with what it was measured on, and the alias `champion` on the best of them."""

from __future__ import annotations

import logging

import mlflow

from .served import MODEL_NAME

log = logging.getLogger(__name__)

REGISTERED = {"vae": "mnist-vae", "ae": "mnist-ae"}
CHAMPION = "champion"
# What "better" means per kind: the test metric the evaluate stage measured, lower is better.
RANK_METRIC = {"vae": "test_iwae_nll", "ae": "test_recon"}


def register(run_id: str, kind: str, data_digest: str, binarize: str,
             metrics: dict[str, float]) -> mlflow.entities.model_registry.ModelVersion:
    """Register the run's model as a new version (once per run: a rerun of evaluate updates its
    tags), and move `champion` to it if it beats the champion on the same data and binarization."""
    client = mlflow.MlflowClient()
    name, metric = REGISTERED[kind], RANK_METRIC[kind]
    tags = {"data.digest": data_digest, "data.binarize": binarize, metric: str(metrics[metric])}
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        version = existing[0]
        for key, value in tags.items():
            client.set_model_version_tag(name, version.version, key, value)
    else:
        version = mlflow.register_model(f"runs:/{run_id}/{MODEL_NAME}", name, tags=tags)
    reason = _why_not_champion(client, name, version.version, tags, metric)
    if reason is None:
        client.set_registered_model_alias(name, CHAMPION, version.version)
        log.info("%s version %s is the %s (%s %.4f)", name, version.version, CHAMPION, metric,
                 metrics[metric])
    else:
        log.info("%s version %s registered; %s stays: %s", name, version.version, CHAMPION, reason)
    return version


def _why_not_champion(client: mlflow.MlflowClient, name: str, version: str,
                      tags: dict[str, str], metric: str) -> str | None:
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:  # no champion yet
        return None
    if str(champion.version) == str(version):  # the client gives it as int or str
        return None
    ours = float(tags[metric])
    for key in ("data.digest", "data.binarize"):
        if champion.tags.get(key) != tags[key]:
            return (f"version {champion.version} was measured on other data ({key} "
                    f"{champion.tags.get(key)}, this version {tags[key]}): {metric} does not compare")
    theirs = float(champion.tags[metric])
    if ours >= theirs:
        return f"its {metric} {ours:.4f} does not beat version {champion.version}'s {theirs:.4f}"
    return None
