"""The trained VAE as an MLflow Model: what `mlflow.pyfunc.load_model` and `mlflow models serve`
give, and its signature.

The pyfunc wraps the plain `VAE` of the best checkpoint (no Lightning at serving time). Input:
float32 images in [0, 1], (n, 784); `params={"method": ...}` picks what `predict` returns:

    encode       (n, 784) images -> (n, latent_dim) posterior means (the default)
    decode       (n, latent_dim) codes -> (n, 784) Bernoulli means
    reconstruct  (n, 784) images -> (n, 784) Bernoulli means of decode(encode(x))
    nll          (n, 784) images -> (n,) IWAE bound on -log p(x), k = params["k"] samples, nats

The AE has no likelihood, so no `nll`. The model is logged as code (served_model.py), not as a
pickle, and carries this package (code_paths), so it loads wherever its pip requirements are
installed, with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false too. Its versions in the Model
Registry: registry.py.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

from .checkpoints import load_vae
from .config import MAX_IWAE_SAMPLES
from .errors import PipelineError
from .model import IMAGE_PIXELS, iwae_nll

MODEL_NAME = "model"  # the logged model's name in its run: runs:/<run id>/model
MODEL_CODE = Path(__file__).with_name("served_model.py")  # what MLflow runs to build the pyfunc
METHODS = {"vae": ("encode", "decode", "reconstruct", "nll"), "ae": ("encode", "decode", "reconstruct")}
DEFAULT_K = 100  # the IWAE samples of evaluate.iwae_samples' default
NLL_SEED = 0  # the bound is a Monte Carlo estimate: the same request gives the same numbers
MAX_ROWS = 10_000  # per request, any method: MNIST's test set, ~160 MB of JSON floats each way
# images x k per nll request: 22-25 s on one shared CPU core at the default model, inside the
# scoring server's 60 s request timeout (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT).
MAX_NLL_SAMPLES = 1_000_000
MAX_CODE = 1e6  # |z| for decode: past ~1e19, float32 sums overflow and the images come back NaN
# What the served model imports; pinned to the versions it was trained with.
REQUIREMENTS = ("torch", "numpy", "mlflow")


class RequestError(MlflowException):
    """A request the model refuses: HTTP 400 from `mlflow models serve`, its one sentence the
    answer's JSON `message`.

    The scoring server rewrites an MlflowException's message into "Failed to predict data
    '<the request's values>'. Error: ..." (and any other exception into "Encountered an
    unexpected error", the reason only in the stack trace), so the sentence is set once, here,
    and later assignments to `message` are ignored."""

    def __init__(self, sentence: str) -> None:
        self._sentence = sentence
        super().__init__(sentence, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._sentence

    @message.setter
    def message(self, _rewritten: str) -> None:
        pass


def checked_rows(model_input: Any, method: str, latent_dim: int) -> torch.Tensor:
    """The request's rows as a float32 tensor, (n, width), or the RequestError that says what
    was expected and how to fix it."""
    decode = method == "decode"
    width, rows = (latent_dim, "latent codes") if decode else (IMAGE_PIXELS, "images in [0, 1]")
    try:
        # float64 first: a value past float32's range is named as itself, not as the inf it
        # would become. Complex numbers would lose their imaginary parts with only a warning.
        with warnings.catch_warnings():
            warnings.simplefilter("error", np.exceptions.ComplexWarning)
            x = np.asarray(model_input, dtype=np.float64)
    except (TypeError, ValueError, OverflowError, np.exceptions.ComplexWarning):
        raise RequestError(f"method {method!r}: expected (n, {width}) {rows} as one array of "
                           "real numbers; got values that are not") from None
    if x.ndim >= 1 and len(x) == 0:
        raise RequestError(f"method {method!r}: got no rows; send 1 to {MAX_ROWS:,} rows of "
                           f"{rows} per request")
    if x.ndim != 2 or x.shape[1] != width:
        raise RequestError(f"method {method!r}: input of shape {x.shape}; expected (n, {width}) "
                           f"{rows}, one row each")
    if len(x) > MAX_ROWS:
        raise RequestError(f"method {method!r}: got {len(x):,} rows; the limit is {MAX_ROWS:,} "
                           "per request: split the batch")
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        noun = "latent codes" if decode else "images"
        raise RequestError(f"{noun} must be finite numbers; got NaN, inf or a missing value in "
                           f"row {int(np.argmin(finite))}: drop or repair that row")
    low, high = float(x.min()), float(x.max())
    if decode and max(high, -low) > MAX_CODE:
        raise RequestError(f"latent codes must lie within +-{MAX_CODE:,.0f} (a sample of the prior "
                           f"N(0, I) lies within +-10); got {max(high, -low):g}")
    if not decode and high > 1:
        fix = "divide uint8 pixels by 255" if high <= 255 else "scale them into [0, 1]"
        raise RequestError(f"images must be floats in [0, 1]; got values up to {high:g}: {fix}")
    if not decode and low < 0:
        raise RequestError(f"images must be floats in [0, 1]; got values down to {low:g}: "
                           "scale them into [0, 1]")
    return torch.from_numpy(x.astype(np.float32))


def checked_k(params: dict) -> int:
    k = params.get("k", DEFAULT_K)
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= MAX_IWAE_SAMPLES:
        raise RequestError(f"k = {k!r}: expected an integer from 1 to {MAX_IWAE_SAMPLES:,} "
                           "importance samples; pass it as params.k")
    return int(k)


class VaeModel(mlflow.pyfunc.PythonModel):
    """The pyfunc around a `VAE` (or the AE) of a train-stage checkpoint."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.vae = load_vae(context.artifacts["checkpoint"])  # weights_only: pickled code refused
        self.kind = "vae" if self.vae.variational else "ae"

    @torch.inference_mode()
    def predict(self, context: Any, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        params = params or {}
        method = params.get("method", "encode")
        if method not in METHODS[self.kind]:
            raise RequestError(f"method {method!r}: the {self.kind.upper()} answers "
                               f"{', '.join(METHODS[self.kind])}; pass one of them as params.method")
        x = checked_rows(model_input, method, self.vae.latent_dim)
        k = checked_k(params) if self.kind == "vae" else None
        if method == "encode":
            return self.vae.encode(x)[0].numpy()
        if method == "decode":
            return torch.sigmoid(self.vae.decode(x)).numpy()
        if method == "reconstruct":
            return self.vae.reconstruct(x).numpy()
        if len(x) * k > MAX_NLL_SAMPLES:
            raise RequestError(f"nll of {len(x):,} images at k = {k:,} needs {len(x) * k:,} samples; "
                               f"the limit is {MAX_NLL_SAMPLES:,} (images x k) per request: send "
                               "fewer images per request or a smaller k")
        # A generator per request: the server's threads share the process-wide one, so seeding
        # that would let concurrent requests draw each other's noise.
        generator = torch.Generator().manual_seed(NLL_SEED)
        return iwae_nll(self.vae, x, k, generator=generator).numpy()


def signature(kind: str) -> ModelSignature:
    # No input schema: MLflow enforces one before predict and refuses a mismatch (an empty batch,
    # a 3-D array) in its own words, pasting the request's values in front; predict checks each
    # method's input instead and says what it expected. Output widths: latent_dim, 784 or none.
    params = [ParamSpec("method", "string", "encode")]
    if kind != "ae":
        params.append(ParamSpec("k", "long", DEFAULT_K))
    return ModelSignature(outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]),
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
        name=MODEL_NAME, python_model=str(MODEL_CODE), artifacts={"checkpoint": str(checkpoint)},
        signature=signature(kind), input_example=example.astype(np.float32),
        pip_requirements=pip_requirements(), code_paths=[str(Path(__file__).parent)])


def one_line_of(err: Exception) -> str:
    first = (str(err).strip().splitlines() or [""])[0]
    return first if isinstance(err, mlflow.exceptions.MlflowException | OSError) else f"{type(err).__name__}: {first}"


def load(model_uri: str) -> VaeModel:
    """The `VaeModel` behind a models:/ or runs:/ URI, for the evaluate CLI and the notebook.
    Pickles are refused from here on in this process, whatever the environment said: ours hold
    none, and an MLmodel edited to name a python_model.pkl would otherwise run the code it
    pickles (MLflow's default allows it)."""
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except Exception as err:  # noqa: BLE001  a tampered model's code fails in its own ways
        if "pickle is disallowed" in str(err):
            raise PipelineError(f"--model {model_uri}: refused, its MLmodel names a pickled "
                                "python_model, which would run whatever code it holds; the train "
                                "stage logs its models as code, with no pickle") from None
        raise PipelineError(f"--model {model_uri}: cannot load it ({one_line_of(err)}); "
                            "pass models:/mnist-vae@champion, models:/mnist-vae/<version> or "
                            "runs:/<run id>/model") from None
    python_model = model.unwrap_python_model()
    if not isinstance(python_model, VaeModel):
        raise PipelineError(f"--model {model_uri}: not a model of this project "
                            f"({type(python_model).__name__}); pass one the train stage logged")
    return python_model
