"""Real Optuna studies on SQLite with the real fit path, tiny epochs: resume, MLflow parent and
children, pruning, parallel workers."""

import dataclasses
import json
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from mnist_vae.config import load_config
from mnist_vae.lit import VaeDataModule
from mnist_vae.study_summary import dvc_command
from mnist_vae.sweep import trial_config
from mnist_vae.train import fit

from .conftest import BIN, artifact_paths, mlflow_runs, run

pytestmark = pytest.mark.slow  # end to end: the fast tier (pytest -m "not slow" -n 0) skips it

SMALL = ["--max-epochs", "2", "--hidden-dims", "[[32], [64, 32]]", "--latent-dim", "[2, 4]",
         "--pruner-startup-trials", "2", "--pruner-warmup-epochs", "1"]
SMALL_OVERRIDES = {f"sweep.{flag[2:].replace('-', '_')}": yaml.safe_load(value)
                   for flag, value in zip(SMALL[::2], SMALL[1::2], strict=True)}


def sweep(project, *flags):
    return run([sys.executable, "pipeline/sweep.py", *SMALL, *flags], project)


def trials(project):
    storage = f"sqlite:///{project / 'sweeps' / 'optuna.db'}"
    return optuna.load_study(study_name="mnist-vae", storage=storage).trials



def test_study_resumes_under_one_parent_run(project, monkeypatch):
    first = sweep(project, "--n-trials", "3", "--seed", "0")
    study = optuna.load_study(study_name="mnist-vae", storage=f"sqlite:///{project / 'sweeps' / 'optuna.db'}")
    assert len(study.trials) == 3
    # Trial 0 is params.yaml's own model (conftest's tiny one), measured like any other.
    assert study.trials[0].params == {"latent_dim": 2, "kl_weight": 1.0, "hidden_dims": "[64, 32]"}
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE
    # best_params.yaml and the rerun line are the study's best trial.
    best = yaml.safe_load((project / "sweeps" / "best_params.yaml").read_text())
    expected = {**study.best_params, "hidden_dims": json.loads(study.best_params["hidden_dims"])}
    assert best == {"model": expected}
    assert first.stdout.strip().splitlines()[-1].strip() == dvc_command(best)
    # Quiet: a line per trial, none of Optuna's experimental-feature warnings, floats shortened.
    assert "Warning" not in first.stderr and "experimental" not in first.stderr, first.stderr
    trial_lines = [line for line in first.stderr.splitlines() if line.startswith("trial ")]
    assert len(trial_lines) == 3 and re.search(r"kl_weight 1\b", trial_lines[0]), trial_lines
    assert not re.search(r"\d\.\d{6}", first.stderr), first.stderr
    assert study.metric_names == ["val_neg_elbo"]
    # A trial's value is what the one training path returns for its config.
    monkeypatch.chdir(project)
    cfg = load_config("params.yaml", overrides=SMALL_OVERRIDES)
    baseline = trial_config(cfg, optuna.trial.FixedTrial(study.trials[0].params))
    torch.set_flush_denormal(True)  # as the sweep's process sets it up
    try:
        with tempfile.TemporaryDirectory() as work_dir:
            result = fit(baseline, VaeDataModule(cfg.data, cfg.train, project / "data"),
                         work_dir=Path(work_dir), progress=False)
    finally:
        torch.set_flush_denormal(False)
    assert result.best["val_neg_elbo"] == study.trials[0].value

    sweep(project, "--n-trials", "2")
    study_trials = trials(project)
    assert [t.number for t in study_trials] == [0, 1, 2, 3, 4]
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
               for t in study_trials)

    runs = mlflow_runs(project)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 5 and parent.info.status == "FINISHED"
    for child in children:
        assert {"model.latent_dim", "model.kl_weight", "model.hidden_dims"} <= set(child.data.params)
        assert child.info.status == "FINISHED"
        assert child.data.tags["optuna.state"] in ("COMPLETE", "PRUNED")
    assert "best_val_neg_elbo" in parent.data.metrics
    plots = artifact_paths(project, parent.info.run_id, "plots")
    assert "plots/rate_distortion.png" in plots and "plots/optimization_history.png" in plots


def test_optuna_dashboard_names_the_objective(project):
    sweep(project, "--n-trials", "1")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([str(BIN / "optuna-dashboard"), f"sqlite:///{project / 'sweeps' / 'optuna.db'}",
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                    studies = json.loads(response.read())["study_summaries"]
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "optuna-dashboard did not start"
                time.sleep(0.5)
        (study,) = studies
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study['study_id']}") as response:
            detail = json.loads(response.read())
        assert study["study_name"] == "mnist-vae" and detail["objective_names"] == ["val_neg_elbo"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_hopeless_trial_is_pruned(project, monkeypatch):
    sweep(project, "--n-trials", "2", "--seed", "0")
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    from mnist_vae.study import PARENT_RUN_ATTR, open_study
    from mnist_vae.sweep import Objective

    cfg = load_config("params.yaml", overrides={**SMALL_OVERRIDES, "sweep.max_epochs": 3})
    study = open_study(cfg)
    study.enqueue_trial({"latent_dim": 2, "kl_weight": 1.0, "hidden_dims": "[32]"})
    # A learning rate this small leaves the model where it started: far above the median.
    hopeless = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=1e-9))
    study.optimize(Objective(hopeless, study.user_attrs[PARENT_RUN_ATTR]), n_trials=1)
    assert study.trials[-1].state == optuna.trial.TrialState.PRUNED


@pytest.mark.parametrize("workers", [2])
def test_parallel_workers_lose_no_trial(project, workers):
    sweep(project, "--n-trials", "4", "--workers", str(workers))
    study_trials = trials(project)
    assert sorted(t.number for t in study_trials) == [0, 1, 2, 3]
    assert all(t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL for t in study_trials)
    children = [r for r in mlflow_runs(project) if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
