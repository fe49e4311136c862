"""The trained VAE as an MLflow Model: what `mlflow.pyfunc.load_model` and `mlflow models serve`
give, its signature, and its versions in the Model Registry with the alias `champion`.

The pyfunc wraps the plain `VAE` of the best checkpoint (no Lightning at serving time). Input:
float32 images in [0, 1], (n, 784); `params={"method": ...}` picks what `predict` returns:

    encode       (n, 784) images -> (n, latent_dim) posterior means (the default)
    decode       (n, latent_dim) codes -> (n, 784) Bernoulli means
    reconstruct  (n, 784) images -> (n, 784) Bernoulli means of decode(encode(x))
    nll          (n, 784) images -> (n,) IWAE bound on -log p(x), k = params["k"] samples, nats

The AE has no likelihood, so no `nll`. The model carries this package (code_paths), so it loads
wherever its pip requirements are installed.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

from .cli import PipelineError
from .evaluate import load_vae
from .model import IMAGE_PIXELS, iwae_nll

log = logging.getLogger(__name__)

MODEL_NAME = "model"  # the logged model's name in its run: runs:/<run id>/model
REGISTERED = {"vae": "mnist-vae", "ae": "mnist-ae"}
CHAMPION = "champion"
# What "better" means per kind: the test metric the evaluate stage measured, lower is better.
RANK_METRIC = {"vae": "test_iwae_nll", "ae": "test_recon"}
METHODS = {"vae": ("encode", "decode", "reconstruct", "nll"), "ae": ("encode", "decode", "reconstruct")}
DEFAULT_K = 100  # the IWAE samples of evaluate.iwae_samples' default
NLL_SEED = 0  # the bound is a Monte Carlo estimate: the same request gives the same numbers
# What the served model imports; pinned to the versions it was trained with.
REQUIREMENTS = ("torch", "numpy", "mlflow")


class VaeModel(mlflow.pyfunc.PythonModel):
    """The pyfunc around a `VAE` (or the AE) of a train-stage checkpoint."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.vae = load_vae(context.artifacts["checkpoint"])
        self.kind = "vae" if self.vae.variational else "ae"

    @torch.inference_mode()
    def predict(self, context: Any, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        params = params or {}
        method = params.get("method", "encode")
        if method not in METHODS[self.kind]:
            raise ValueError(f"method {method!r}: the {self.kind.upper()} answers "
                             f"{', '.join(METHODS[self.kind])}")
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        width = self.vae.latent_dim if method == "decode" else IMAGE_PIXELS
        if x.ndim != 2 or x.shape[1] != width:
            what = "latent codes" if method == "decode" else "images in [0, 1]"
            raise ValueError(f"method {method!r}: input of shape {tuple(x.shape)}; expected "
                             f"(n, {width}) {what}")
        if method == "encode":
            return self.vae.encode(x)[0].numpy()
        if method == "decode":
            return torch.sigmoid(self.vae.decode(x)).numpy()
        if method == "reconstruct":
            return torch.sigmoid(self.vae.decode(self.vae.encode(x)[0])).numpy()
        k = int(params.get("k", DEFAULT_K))
        if not 1 <= k <= 10_000:
            raise ValueError(f"k = {k}: expected an integer from 1 to 10,000 importance samples")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(NLL_SEED)
            return iwae_nll(self.vae, x, k).numpy()


def signature(kind: str) -> ModelSignature:
    # The width is -1: decode takes (n, latent_dim) codes, the others (n, 784) images; predict
    # checks the width of each method and says which it expected.
    params = [ParamSpec("method", "string", "encode")]
    if kind == "vae":
        params.append(ParamSpec("k", "long", DEFAULT_K))
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]),
                          params=ParamSchema(params))


def pip_requirements() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}" for name in REQUIREMENTS]


def log_model(checkpoint: Path, kind: str, example: np.ndarray) -> mlflow.models.model.ModelInfo:
    """Log the checkpoint's model as `model` of the active run. example: (n, 784) uint8 or float
    images, a few of them, stored as the input example."""
    example = np.asarray(example, dtype=np.float32)
    if example.max() > 1:
        example = example / 255
    return mlflow.pyfunc.log_model(
        name=MODEL_NAME, python_model=VaeModel(), artifacts={"checkpoint": str(checkpoint)},
        signature=signature(kind), input_example=example.astype(np.float32),
        pip_requirements=pip_requirements(), code_paths=[str(Path(__file__).parent)])


def load(model_uri: str) -> VaeModel:
    """The `VaeModel` behind a models:/ or runs:/ URI, for the evaluate CLI."""
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except (mlflow.exceptions.MlflowException, OSError) as err:
        raise PipelineError(f"--model {model_uri}: cannot load it ({str(err).splitlines()[0]}); "
                            "pass models:/mnist-vae@champion, models:/mnist-vae/<version> or "
                            "runs:/<run id>/model") from None
    python_model = model.unwrap_python_model()
    if not isinstance(python_model, VaeModel):
        raise PipelineError(f"--model {model_uri}: not a model of this project "
                            f"({type(python_model).__name__}); pass one the train stage logged")
    return python_model


# ---------------------------------------------------------------------------------------------
# The Model Registry

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
