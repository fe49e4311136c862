"""MLflow's UI in headless Chromium (scripts/ui_screenshot.py, docs/ui.md): which sidebar a new
user's browser shows on the runs page, a run's page and the Models page; and the metric values
the run page prints. One `mlflow ui` for the module, on a store the project's own tracking code
writes (a pipeline run's experiment, tags, a system metric and test metrics; a registered model).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from mnist_vae import tracking

from .conftest import ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
browser = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (Debian: apt-get install chromium)")

spec = importlib.util.spec_from_file_location("ui_screenshot", ROOT / "scripts" / "ui_screenshot.py")
ui_screenshot = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ui_screenshot)

NEG_ELBO = 158.52334594726562  # a float32 loss as a double: what the issue saw the run page print
WRITE_STORE = f"""
import sys, mlflow
from mnist_vae import tracking
from mnist_vae.config import load_config
with tracking.pipeline_run(load_config(sys.argv[1])) as run:
    tracking.log_results({{"test_neg_elbo": {NEG_ELBO!r}, "test_iwae_nll": 154.5547, "n_test": 500}})
    mlflow.log_metric("system/cpu_utilization_percentage", 42.0)
client = mlflow.MlflowClient()
client.create_registered_model(tracking.EXPERIMENT)
client.create_model_version(tracking.EXPERIMENT, run.info.artifact_uri + "/model", run.info.run_id)
print(run.info.run_id)
"""


def write_store(folder: Path) -> tuple[str, str]:
    """A store as the pipeline writes it, in `folder`: its URI and the run's id."""
    store = f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"
    written = subprocess.run([sys.executable, "-c", WRITE_STORE, str(ROOT / "params.yaml")], cwd=folder,
                             env={**os.environ, "MLFLOW_TRACKING_URI": store}, capture_output=True, text=True,
                             timeout=300)
    assert written.returncode == 0, written.stderr
    return store, written.stdout.split()[-1]


def test_metric_value_keeps_float32_precision_not_its_noise():
    assert tracking.metric_value(NEG_ELBO) == 158.5233
    assert tracking.metric_value(0.284000009298325) == 0.284
    assert tracking.metric_value(2) == 2.0
    assert math.isnan(tracking.metric_value(float("nan")))
    assert tracking.metric_value(float("-inf")) == float("-inf")


@pytest.fixture(scope="module")
def ui(tmp_path_factory) -> dict:
    """One `mlflow ui` on a store the pipeline's code wrote, and a new browser's walk through it
    (scripts/ui_screenshot.py: every step's sidebar, URL and screenshot)."""
    folder = tmp_path_factory.mktemp("ui")
    store, run_id = write_store(folder)
    run = mlflow.MlflowClient(store).get_run(run_id)
    server = ui_screenshot.start_ui(store, port := ui_screenshot.free_port())
    try:
        steps = asyncio.run(ui_screenshot.check(f"http://127.0.0.1:{port}", folder / "screenshots",
                                                run.info.experiment_id, run_id, run.info.run_name, CHROMIUM))
    finally:
        ui_screenshot.stop_ui(server)
    (folder / "steps.json").write_text(json.dumps(steps, indent=1))
    return steps


@pytest.mark.slow
def test_the_store_holds_rounded_metrics_and_the_experiment_kind(tmp_path: Path):
    """Without a browser: what the pipeline's tracking code writes for the UI."""
    store, run_id = write_store(tmp_path)
    client = mlflow.MlflowClient(store)
    run = client.get_run(run_id)
    assert run.data.metrics["test_neg_elbo"] == 158.5233
    assert run.data.tags["n_test"] == "500"
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.slow
@browser
@pytest.mark.parametrize("step", ["1-runs-readme-link", "2b-run-link", "5-experiment-after-switch",
                                  "6-run-after-switch", "7-models-after-switch"])
def test_model_training_sidebar(ui, step):
    """The README's links, and every page once the sidebar's switch has been set to Model training."""
    page = ui[step]
    assert page["view"] == "model training", (page["url"], page["items"], page["screenshot"])


@pytest.mark.slow
@browser
@pytest.mark.parametrize("step", ["0-experiment", "2-run-clicked", "3-models-link", "4-models"])
def test_mlflow_still_defaults_to_genai(ui, step):
    """MLflow 3.17 in a new browser: the experiment's kind tag is not read, a clicked run link and
    the Models page drop ?workflowType=. If this fails, MLflow changed: update docs/ui.md."""
    page = ui[step]
    assert page["view"] == "genai", (page["url"], page["items"], page["screenshot"])
    assert page["stored"] is None


@pytest.mark.slow
@browser
def test_run_page_lists_system_metrics_first(ui):
    """MLflow's fixed order (docs/ui.md): nothing a run carries changes it."""
    assert ui["6-run-after-switch"]["metric_groups"] == ["System metrics", "Model metrics"]
