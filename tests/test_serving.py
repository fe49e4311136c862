"""The trained model as MLflow users take it: the logged pyfunc, the registry's `champion`, a real
`mlflow models serve` process, and what the pipeline run shows in the UI. One tiny `dvc repro`
for the module; the registry test adds its runs with `dvc exp run --temp`, which leaves the
workspace (models/) as the first run wrote it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest

from mnist_vae.checkpoints import load_vae
from mnist_vae.data import load_split, to_float
from mnist_vae.idx import DataSource

from .conftest import BIN, artifact_paths, make_project, mlflow_runs, pipeline_runs, run

pytestmark = pytest.mark.slow  # end to end: the fast tier (pytest -m "not slow" -n 0) skips it

N_IMAGES = 5


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    repo = make_project(tmp_path_factory.mktemp("serving") / "project")
    # A system-metrics sample every 0.2 s: the tiny training ends before MLflow's default 10 s.
    run(["dvc", "repro"], repo, env_extra={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.2",
                                          "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "1"})
    return repo


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
           "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"}
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


def invoke(url: str, inputs: np.ndarray, **params) -> np.ndarray:
    body = json.dumps({"inputs": inputs.tolist(), "params": params}).encode()
    request = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return np.asarray(json.loads(response.read())["predictions"])


def test_champion_encodes_as_its_checkpoint(project, store, images):
    champion = store.get_model_version_by_alias("mnist-vae", "champion")
    checkpoint = mlflow.artifacts.download_artifacts(run_id=champion.run_id,
                                                     artifact_path="checkpoints/best.ckpt")
    model = mlflow.pyfunc.load_model("models:/mnist-vae@champion")
    np.testing.assert_array_equal(model.predict(images),
                                  load_vae(checkpoint).encode(torch_of(images))[0].detach().numpy())
    assert model.predict(images, params={"method": "nll", "k": 3}).shape == (N_IMAGES,)
    assert model.metadata.get_input_schema().inputs[0].shape == (-1, -1)
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


def test_champion_moves_only_for_a_better_model_on_the_same_data(project, store):
    def versions() -> dict[str, dict]:
        return {str(v.version): v.tags for v in store.search_model_versions("name = 'mnist-vae'")}

    def champion() -> str:
        return str(store.get_model_version_by_alias("mnist-vae", "champion").version)

    (v1,) = versions().values()
    digest = DataSource.read(project / "data").digest
    test_iwae_nll = json.loads((project / "metrics" / "evaluate.json").read_text())["test_iwae_nll"]
    assert v1 == {"data.digest": digest, "data.binarize": "none", "test_iwae_nll": str(test_iwae_nll)}
    assert champion() == "1"

    worse = run(["dvc", "exp", "run", "--temp", "-S", "train.max_epochs=1"], project)
    assert set(versions()) == {"1", "2"}
    assert float(versions()["2"]["test_iwae_nll"]) > float(v1["test_iwae_nll"])
    assert champion() == "1"
    assert "mnist-vae version 2 registered; champion stays: its test_iwae_nll" in worse.stdout + worse.stderr

    run(["dvc", "exp", "run", "--temp", "-S", "train.max_epochs=6"], project)
    assert float(versions()["3"]["test_iwae_nll"]) < float(v1["test_iwae_nll"])
    assert champion() == "3"
