"""The trained model as MLflow users take it: the logged pyfunc, the registry's `champion`, a real
`mlflow models serve` process (which refuses pickles and bad requests), and what the pipeline run
shows in the UI. One tiny `dvc repro`
for the module; the registry test adds its runs with `dvc exp run --temp`, which leaves the
workspace (models/) as the first run wrote it."""

from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from mnist_vae import registry, served
from mnist_vae.checkpoints import UnsafeCheckpointError, load_vae
from mnist_vae.data import load_split, to_float
from mnist_vae.errors import PipelineError
from mnist_vae.idx import DataSource

from .conftest import BIN, artifact_paths, copy_project, mlflow_runs, pipeline_runs, run

pytestmark = pytest.mark.slow  # end to end: the fast tier (pytest -m "not slow" -n 0) skips it

N_IMAGES = 5


@pytest.fixture(scope="module")
def project(trained_once, tmp_path_factory) -> Path:
    return copy_project(trained_once, tmp_path_factory.mktemp("serving") / "project")


@pytest.fixture
def store(project, monkeypatch) -> mlflow.MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    return mlflow.MlflowClient()


@pytest.fixture(scope="module")
def images(project) -> np.ndarray:
    return to_float(load_split("test", project / "data")[0][:N_IMAGES]).numpy()  # (5, 784) float32


@pytest.fixture(scope="module")
def server(project) -> str:
    """`mlflow models serve` of the champion, on a free port of 127.0.0.1, for the module."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlruns' / 'mlflow.db'}",
           "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}  # the model needs no pickle
    proc = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", "models:/mnist-vae@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)  # its own process group: uvicorn's worker stops with it
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping in 180 s"
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def post(url: str, inputs: np.ndarray | list, params: dict) -> tuple[int, dict]:
    """The HTTP status and JSON answer of one /invocations request."""
    body = json.dumps({"inputs": np.asarray(inputs).tolist(), "params": params}).encode()
    request = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


def invoke(url: str, inputs: np.ndarray, **params) -> np.ndarray:
    status, answer = post(url, inputs, params)
    assert status == 200, answer
    return np.asarray(answer["predictions"])


def test_champion_encodes_as_its_checkpoint(project, store, images):
    champion = store.get_model_version_by_alias("mnist-vae", "champion")
    checkpoint = mlflow.artifacts.download_artifacts(run_id=champion.run_id,
                                                     artifact_path="checkpoints/best.ckpt")
    model = mlflow.pyfunc.load_model("models:/mnist-vae@champion")
    np.testing.assert_array_equal(model.predict(images),
                                  load_vae(checkpoint).encode(torch_of(images))[0].detach().numpy())
    assert model.predict(images, params={"method": "nll", "k": 3}).shape == (N_IMAGES,)
    assert model.metadata.get_input_schema() is None  # predict checks the input, in its own words
    assert {p.name: p.default for p in model.metadata.get_params_schema().params} == \
        {"method": "encode", "k": 100}


def torch_of(array: np.ndarray):
    import torch

    return torch.from_numpy(array)


def test_the_counterpart_ae_logs_its_model_without_nll(project, store, images):
    (parent,) = pipeline_runs(project)
    (child,) = [r for r in mlflow_runs(project) if r.info.run_id != parent.info.run_id]
    ae = mlflow.pyfunc.load_model(f"runs:/{child.info.run_id}/model")
    assert ae.predict(images, params={"method": "reconstruct"}).shape == (N_IMAGES, 784)
    with pytest.raises(Exception, match="method 'nll': the AE answers encode, decode, reconstruct"):
        ae.predict(images, params={"method": "nll"})
    assert [p.name for p in ae.metadata.get_params_schema().params] == ["method"]


def test_served_champion_answers_each_method(server, images, store):
    latent = invoke(server, images)  # encode is the default
    assert latent.shape == (N_IMAGES, 2)
    local = mlflow.pyfunc.load_model("models:/mnist-vae@champion").predict(images)
    np.testing.assert_allclose(latent, local, rtol=0, atol=1e-6)
    assert invoke(server, latent.astype(np.float32), method="decode").shape == (N_IMAGES, 784)
    reconstructed = invoke(server, images, method="reconstruct")
    assert reconstructed.shape == (N_IMAGES, 784) and 0 <= reconstructed.min() <= reconstructed.max() <= 1
    nll = invoke(server, images, method="nll", k=3)
    assert nll.shape == (N_IMAGES,) and (nll > 0).all()


class RunsACommand:
    """What a tampered artifact carries: unpickled, it runs a shell command (touching a file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


PICKLE_HEADERS = {b"\x80" + bytes([protocol]) for protocol in range(2, 6)}


def test_the_logged_model_holds_no_pickle_and_loads_without_one(store, images, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    local = Path(mlflow.artifacts.download_artifacts("models:/mnist-vae@champion", dst_path=str(tmp_path)))
    files = [path for path in local.rglob("*") if path.is_file()]
    assert {"MLmodel", "served_model.py", "best.ckpt"} <= {path.name for path in files}
    for path in files:
        assert path.suffix not in (".pkl", ".pickle"), path
        if zipfile.is_zipfile(path):  # torch's format: its data.pkl may hold tensors and plain values only
            torch.load(path, map_location="cpu", weights_only=True)
        else:
            assert path.read_bytes()[:2] not in PICKLE_HEADERS, path
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["model_code_path"].endswith("served_model.py") and "python_model" not in flavor
    model = mlflow.pyfunc.load_model(str(local))
    np.testing.assert_array_equal(model.predict(images),
                                  mlflow.pyfunc.load_model("models:/mnist-vae@champion").predict(images))


def test_a_tampered_model_is_refused_or_ignored_never_run(store, images, tmp_path):
    original = Path(mlflow.artifacts.download_artifacts("models:/mnist-vae@champion",
                                                        dst_path=str(tmp_path / "model")))
    marker = tmp_path / "the command ran"
    beside, named, swapped = tmp_path / "beside", tmp_path / "named", tmp_path / "swapped"
    for copy in (beside, named, swapped):
        shutil.copytree(original, copy)
    # python_model.pkl is what a pickled pyfunc loads from; best.ckpt is torch's zip of a pickle.
    for copy in (beside, named):
        (copy / "python_model.pkl").write_bytes(pickle.dumps(RunsACommand(marker)))
    mlmodel = yaml.safe_load((named / "MLmodel").read_text())  # as a pickled pyfunc's reads
    flavor = mlmodel["flavors"]["python_function"]
    del flavor["model_code_path"]
    flavor.update(python_model="python_model.pkl", loader_module="mlflow.pyfunc.model")
    (named / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    torch.save(RunsACommand(marker), swapped / "artifacts" / "best.ckpt")
    np.testing.assert_array_equal(mlflow.pyfunc.load_model(str(beside)).predict(images),
                                  mlflow.pyfunc.load_model(str(original)).predict(images))
    with pytest.raises(UnsafeCheckpointError, match="best.ckpt: refused, it holds more than tensors"):
        mlflow.pyfunc.load_model(str(swapped))
    # What the evaluate CLI and the notebook load through refuses pickles, whatever the
    # environment says (MLflow's default allows them).
    with pytest.raises(PipelineError, match="refused, its MLmodel names a pickled python_model"):
        served.load(str(named))
    assert not marker.exists()
    # The payload is live: loaded without weights_only, the same object runs its command.
    torch.load(swapped / "artifacts" / "best.ckpt", weights_only=False)
    assert marker.exists()


class PickledModel(mlflow.pyfunc.PythonModel):
    """A model as older code logged it, a pickle (python_model.pkl), whose unpickling runs a command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)

    def predict(self, context, model_input):
        return model_input


def test_the_champion_gate_reads_only_a_versions_weights(project, store, tmp_path):
    """The gate scores the champion from its checkpoint artifact: a version that older code logged
    as a pickle is judged too (served.load refuses it), and none of its code runs."""
    marker = tmp_path / "the command ran"
    # An experiment of its own: the module's other tests count the pipeline experiment's runs.
    with mlflow.start_run(experiment_id=store.create_experiment("logged-by-older-code")):
        info = mlflow.pyfunc.log_model(name="model", python_model=PickledModel(marker),
                                       artifacts={"checkpoint": str(project / "models" / "best.ckpt")})
    assert not marker.exists()
    vae = registry.logged_weights(info.model_uri)
    expected = load_vae(project / "models" / "best.ckpt").state_dict()
    assert all(torch.equal(w, expected[k]) for k, w in vae.state_dict().items())
    assert not marker.exists()


def test_served_model_refuses_bad_requests_in_its_own_words(server, images):
    pixels = (images * 255).round().astype(np.uint8)  # the usual mistake: MNIST's raw bytes
    holed = images.copy()
    holed[1, 100] = np.nan
    codes = np.zeros((2, 2), dtype=np.float32)
    codes[1, 0] = np.inf
    requests = [
        (pixels, {}, "images must be floats in [0, 1]; got values up to 255: divide uint8 pixels by 255"),
        (-images, {}, "images must be floats in [0, 1]; got values down to -1: scale them into [0, 1]"),
        (holed, {"method": "reconstruct"},
         "images must be finite numbers; got NaN, inf or a missing value in row 1: drop or repair that row"),
        (codes, {"method": "decode"},
         "latent codes must be finite numbers; got NaN, inf or a missing value in row 1: drop or repair that row"),
        # Finite, but past float32's range (inf there), and codes whose decoding overflows to NaN.
        (np.full((1, 784), 1e39), {},
         "images must be floats in [0, 1]; got values up to 1e+39: scale them into [0, 1]"),
        ([[3e38, -3e38]], {"method": "decode"}, "latent codes must lie within +-1,000,000 (a sample "
         "of the prior N(0, I) lies within +-10); got 3e+38"),
        ([[10**400] + [0] * 783], {}, "method 'encode': expected (n, 784) images in [0, 1] as one "
         "array of real numbers; got values that are not"),
        (images[:, :783], {}, "method 'encode': input of shape (5, 783); expected (n, 784) images in "
         "[0, 1], one row each"),
        ([], {}, "method 'encode': got no rows; send 1 to 10,000 rows of images in [0, 1] per request"),
        (np.zeros((10_001, 2)), {"method": "decode"},
         "method 'decode': got 10,001 rows; the limit is 10,000 per request: split the batch"),
        (images, {"method": "nll", "k": 0}, "k = 0: expected an integer from 1 to 10,000 importance "
         "samples; pass it as params.k"),
        (images, {"method": "nll", "k": None}, "k = None: expected an integer from 1 to 10,000 "
         "importance samples; pass it as params.k"),
        (images, {"method": "encode", "k": -1}, "k = -1: expected an integer from 1 to 10,000 "
         "importance samples; pass it as params.k"),
        (np.zeros((101, 784)), {"method": "nll", "k": 10_000}, "nll of 101 images at k = 10,000 needs "
         "1,010,000 samples; the limit is 1,000,000 (images x k) per request: send fewer images per "
         "request or a smaller k"),
        (images, {"method": "sample"}, "method 'sample': the VAE answers encode, decode, reconstruct, "
         "nll; pass one of them as params.method"),
    ]
    answers = [post(server, inputs, params) for inputs, params, _ in requests]
    assert [(status, answer["message"]) for status, answer in answers] == \
        [(400, message) for *_, message in requests]


def test_concurrent_nll_requests_give_the_numbers_of_the_same_requests_one_by_one(server, store, images):
    # k = 1000 and up: several noise draws per request (iwae_nll's chunks), so requests interleave.
    requests = [(images[first:], k) for first in range(4) for k in (1000, 1500)]

    def nll(request: tuple[np.ndarray, int]) -> np.ndarray:
        return invoke(server, request[0], method="nll", k=request[1])

    one_by_one = [nll(request) for request in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(nll, requests))
    for alone, concurrent in zip(one_by_one, together, strict=True):
        np.testing.assert_array_equal(concurrent, alone)
    local = mlflow.pyfunc.load_model("models:/mnist-vae@champion")
    np.testing.assert_array_equal(one_by_one[0], local.predict(images, params={"method": "nll", "k": 1000}))


def test_pipeline_run_as_the_ui_shows_it(project):
    (parent,) = pipeline_runs(project)
    commit = run(["git", "rev-parse", "--short", "HEAD"], project).stdout.strip()
    assert parent.info.run_name == f"vae-z2-{commit}"
    assert not [k for k in parent.data.params if k.startswith("sweep.")]
    experiment = mlflow.MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}").get_experiment(
        parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.data.params["train.images_every_epochs"] == "5"
    constants = {"epochs", "best_epoch", "iwae_samples", "n_test"}
    assert not constants & set(parent.data.metrics)
    assert {k: parent.data.tags[k] for k in constants} == \
        {"epochs": "2", "best_epoch": "1", "iwae_samples": "5", "n_test": "500"}
    assert json.loads((project / "metrics" / "train.json").read_text())["epochs"] == 2
    assert any(k.startswith("system/cpu_utilization") for k in parent.data.metrics)
    # Images at epoch 0 and at the last (1): 2 keys x 2 steps, each a PNG and a webp thumbnail.
    names = [Path(p).name.split("+") for p in artifact_paths(project, parent.info.run_id, "images")]
    assert sorted(f"{key}@{step}" for key, _, step, *_, last in names if last.endswith(".png")) == \
        ["prior_samples@0", "prior_samples@1", "reconstructions@0", "reconstructions@1"]

    # The Models tab: the run's logged model carries its validation and test metrics.
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    models = client.search_logged_models(experiment_ids=[parent.info.experiment_id],
                                         order_by=[{"field_name": "metrics.test_iwae_nll", "ascending": True}])
    (ours,) = [m for m in models if m.source_run_id == parent.info.run_id]
    assert {m.key for m in ours.metrics} >= {"best_val_neg_elbo", "test_iwae_nll", "test_neg_elbo"}
    assert models[0].model_id == ours.model_id  # ranked first: the other model (the AE's) has no IWAE


def test_evaluate_cli_scores_a_logged_model_as_its_checkpoint(project):
    (parent,) = pipeline_runs(project)
    common = ["--images", "data/t10k-images-idx3-ubyte.gz", "--iwae-samples", "3"]
    by_checkpoint = run([sys.executable, "-m", "mnist_vae", "evaluate", "--checkpoint",
                         "models/best.ckpt", *common], project)
    by_model = run([sys.executable, "-m", "mnist_vae", "evaluate", "--model",
                    f"runs:/{parent.info.run_id}/model", *common], project)
    assert by_model.stdout.splitlines()[-1] == by_checkpoint.stdout.splitlines()[-1]
    missing = run([sys.executable, "-m", "mnist_vae", "evaluate", "--model", "models:/mnist-vae@nope",
                   *common], project, check=False)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert missing.stderr.startswith("error: --model models:/mnist-vae@nope: cannot load it (")


# Registers (or judges again) a version from its run, as the evaluate stage does: `new RUN CKPT`
# logs the checkpoint as a new run's model first; `again VERSION` judges an existing version.
REGISTER = """
import sys
from pathlib import Path
import mlflow
from mnist_vae import registry, served
from mnist_vae.data import load_split
from mnist_vae.evaluate import per_image_nats
from mnist_vae.idx import DataSource
images = load_split("test", Path("data"))[0]
def score(vae):
    return per_image_nats(vae, images, 5, 500, 0)
client = mlflow.MlflowClient()
if sys.argv[1] == "new":
    mlflow.set_experiment("mnist-vae")
    with mlflow.start_run() as run:
        served.log_model(Path(sys.argv[2]), "vae", images[:5].numpy())
    run_id, claimed = run.info.run_id, float(sys.argv[3])
else:
    version = client.get_model_version("mnist-vae", sys.argv[2])
    run_id, claimed = version.run_id, float(version.tags["test_iwae_nll"])
model = served.load(f"runs:/{run_id}/model").vae
registry.register(run_id, "vae", DataSource.read(Path("data")).digest, "none", {"test_iwae_nll": claimed},
                  score, model, 2.0, Path(".champion.lock"))
"""


def test_champion_moves_only_on_evidence_even_when_evaluations_race(project, store):
    def versions() -> dict[str, dict]:
        return {str(v.version): v.tags for v in store.search_model_versions("name = 'mnist-vae'")}

    def champion() -> str:
        return str(store.get_model_version_by_alias("mnist-vae", "champion").version)

    def register(*args: str) -> subprocess.Popen:
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
        return subprocess.Popen([sys.executable, "-c", REGISTER, *args], cwd=project, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    (v1,) = versions().values()
    digest = DataSource.read(project / "data").digest
    test_iwae_nll = json.loads((project / "metrics" / "evaluate.json").read_text())["test_iwae_nll"]
    assert v1 == {"data.digest": digest, "data.binarize": "none", "model.kind": "vae",
                  "test_iwae_nll": str(test_iwae_nll)}
    assert champion() == "1"

    worse = run(["dvc", "exp", "run", "--temp", "-S", "train.max_epochs=1"], project)
    assert champion() == "1" and versions()["2"]["champion.compared_with"] == "1"
    assert float(versions()["2"]["champion.z"]) < 0
    assert "mnist-vae version 2 registered; champion stays: version 2 is " in worse.stdout + worse.stderr

    # v1's own weights as a new version, its mean lower by luck: the old rule moved the alias.
    by_noise = register("new", "models/best.ckpt", str(test_iwae_nll - 0.5))
    out, _ = by_noise.communicate(timeout=120)
    assert by_noise.returncode == 0, out
    assert champion() == "1"
    assert versions()["3"]["champion.verdict"] == ("champion stays: version 3 is 0.00 +- 0.00 nats per "
                                                   "image better than version 1, not significant (z = 0.0 <= 2.0)")

    run(["dvc", "exp", "run", "--temp", "-S", "train.max_epochs=6"], project)
    assert champion() == "4" and float(versions()["4"]["champion.z"]) > 2.0

    # The worst version champion again, then two better ones judged at once: whichever lands
    # first, the second is judged against it, so the alias ends on the best (4), never on 1.
    store.set_registered_model_alias("mnist-vae", "champion", "2")
    racers = [register("again", "1"), register("again", "4")]
    for racer in racers:
        out, _ = racer.communicate(timeout=180)
        assert racer.returncode == 0, out
    assert champion() == "4"
