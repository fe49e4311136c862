"""notebooks/explore.ipynb run top to bottom by nbclient, as a learner runs it, against a tiny
trained project: on its latest pipeline run (the default), on models/best.ckpt and on the
registered champion, each named in the knob cell."""

import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from mnist_vae.tracking import metric_value

from .conftest import ROOT, copy_project

pytestmark = pytest.mark.slow  # a dvc repro and a Jupyter kernel per case

FIGURES = ["latent-space", "reconstructions", "prior-samples", "interpolation", "latent-grid",
           "kl-per-dimension"]  # the ids of the cells that draw one figure each
NO_LIGHTNING = "import sys\nprint(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning'}))"


@pytest.fixture(scope="module")
def trained(trained_once: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = copy_project(trained_once, tmp_path_factory.mktemp("notebook") / "project")
    shutil.copytree(ROOT / "notebooks", project / "notebooks")
    return project


def execute(project: Path, model: str | None) -> dict[str, nbformat.NotebookNode]:
    """The notebook's code cells by id after a run with MODEL = model (None: as committed), and a
    last one, "lightning", that lists the Lightning modules the kernel imported."""
    notebook = nbformat.read(project / "notebooks" / "explore.ipynb", as_version=4)
    (knobs,) = [cell for cell in notebook.cells if cell.id == "knobs"]
    assert re.search(r"^MODEL = None$", knobs.source, re.M), "the knob cell names no MODEL"
    if model is not None:
        knobs.source = re.sub(r"^MODEL = None$", f"MODEL = {model!r}", knobs.source, flags=re.M)
    notebook.cells.append(nbformat.v4.new_code_cell(NO_LIGHTNING, id="lightning"))
    # cwd = notebooks/, as Jupyter starts a kernel; an error in any cell raises CellExecutionError.
    NotebookClient(notebook, kernel_name="python3", timeout=120,
                   resources={"metadata": {"path": str(project / "notebooks")}}).execute()
    return {cell.id: cell for cell in notebook.cells if cell.cell_type == "code"}


def text(cell: nbformat.NotebookNode) -> str:
    return "".join(out.get("text", "") + out.get("data", {}).get("text/plain", "") for out in cell.outputs)


@pytest.mark.parametrize("model", [None, "models/best.ckpt", "models:/mnist-vae@champion"])
def test_the_notebook_runs_and_draws_every_figure(trained, model, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own store
    if model == "models/best.ckpt":
        model = str(trained / model)
    cells = execute(trained, model)

    assert not [out for cell in cells.values() for out in cell.outputs if out.output_type == "error"]
    assert all(cell.execution_count for cell in cells.values())  # every cell ran
    assert [name for name, cell in cells.items() if "figure" in cell.metadata.get("tags", [])] == FIGURES
    for name in FIGURES:  # one image each: a Figure is shown once, not twice
        assert len([out for out in cells[name].outputs if "image/png" in out.get("data", {})]) == 1, name
    # Every case finds the one pipeline run (not its counterpart's child run, started later).
    run_id = json.loads((trained / "models" / "mlflow_run.json").read_text())["run_id"]
    loaded = text(cells["open-model"])
    assert f"run {run_id}" in loaded and "VAE, latent_dim 2" in loaded, loaded
    if model is not None and model.endswith(".ckpt"):
        assert model in loaded
    tables = "".join(out.data.get("text/html", "") for out in cells["run-tables"].outputs)
    evaluated = json.loads((trained / "metrics" / "evaluate.json").read_text())
    # As MLflow stores it (7 significant digits), to the 4 decimals the table shows.
    assert "test_iwae_nll" in tables and str(round(metric_value(evaluated["test_iwae_nll"]), 4)) in tables
    assert "500 test images of mnist" in text(cells["test-digits"])
    assert text(cells["lightning"]).strip() == "[]"  # no Lightning in the kernel
