"""The trained VAE as an MLflow Model: what `mlflow.pyfunc.load_model` and `mlflow models serve`
give, and its signature.

The pyfunc wraps the plain `VAE` of the best checkpoint (no Lightning at serving time). Input:
float32 images in [0, 1], (n, 784); `params={"method": ...}` picks what `predict` returns:

    encode       (n, 784) images -> (n, latent_dim) posterior means (the default)
    decode       (n, latent_dim) codes -> (n, 784) Bernoulli means
    reconstruct  (n, 784) images -> (n, 784) Bernoulli means of decode(encode(x))
    nll          (n, 784) images -> (n,) IWAE bound on -log p(x), k = params["k"] samples, nats

The AE has no likelihood, so no `nll`. The model carries this package (code_paths), so it loads
wherever its pip requirements are installed. Its versions in the Model Registry: registry.py.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

from .checkpoints import load_vae
from .config import MAX_IWAE_SAMPLES
from .errors import PipelineError
from .model import IMAGE_PIXELS, iwae_nll

MODEL_NAME = "model"  # the logged model's name in its run: runs:/<run id>/model
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
            return self.vae.reconstruct(x).numpy()
        k = int(params.get("k", DEFAULT_K))
        if not 1 <= k <= MAX_IWAE_SAMPLES:
            raise ValueError(f"k = {k}: expected an integer from 1 to {MAX_IWAE_SAMPLES:,} importance samples")
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
