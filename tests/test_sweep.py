"""Real Optuna studies on SQLite with the real fit path, tiny epochs: resume, MLflow parent and
children, pruning, parallel workers, the rate-distortion (multi-objective) study and its Pareto
front. End to end, so marked slow (the fast tier, pytest -m "not slow" -n 0, skips them), but for
the check that a study is reopened only with its own objective."""

import csv
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

import mlflow
import optuna
import pytest
import torch
import yaml

from mnist_vae.config import load_config
from mnist_vae.errors import PipelineError
from mnist_vae.lit import VaeDataModule
from mnist_vae.study import create_or_open_study
from mnist_vae.study_summary import dvc_command
from mnist_vae.sweep import trial_config
from mnist_vae.train import fit

from .conftest import BIN, ROOT, artifact_paths, mlflow_runs, run

SMALL = ["--max-epochs", "2", "--hidden-dims", "[[32], [64, 32]]", "--latent-dim", "[2, 4]",
         "--pruner-startup-trials", "2", "--pruner-warmup-epochs", "1"]
SMALL_OVERRIDES = {f"sweep.{flag[2:].replace('-', '_')}": yaml.safe_load(value)
                   for flag, value in zip(SMALL[::2], SMALL[1::2], strict=True)}


def sweep(project, *flags):
    return run([sys.executable, "pipeline/sweep.py", *SMALL, *flags], project)


def trials(project):
    storage = f"sqlite:///{project / 'sweeps' / 'optuna.db'}"
    return optuna.load_study(study_name="mnist-vae", storage=storage).trials


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_hopeless_trial_is_pruned(project, monkeypatch):
    sweep(project, "--n-trials", "2", "--seed", "0", "--max-epochs", "3")  # past the pruner's warm-up
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


@pytest.mark.slow
@pytest.mark.parametrize("workers", [2])
def test_parallel_workers_lose_no_trial(project, workers):
    sweep(project, "--n-trials", "4", "--workers", str(workers))
    study_trials = trials(project)
    assert sorted(t.number for t in study_trials) == [0, 1, 2, 3]
    assert all(t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL for t in study_trials)
    children = [r for r in mlflow_runs(project) if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)


@pytest.mark.slow
def test_rate_distortion_sweep_writes_its_pareto_front(project):
    # At seed 2 all three trials are on the front, and their order by rate is not by number.
    done = sweep(project, "--objective", "rate_distortion", "--n-trials", "3", "--seed", "2",
                 "--hidden-dims", "[[16]]", "--pruner", "median")
    study = optuna.load_study(study_name="mnist-vae", storage=f"sqlite:///{project / 'sweeps' / 'optuna.db'}")
    assert study.directions == [optuna.study.StudyDirection.MINIMIZE] * 2
    assert study.metric_names == ["val_kl", "val_recon"]
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3  # none pruned
    for trial in study.trials:  # the values are the terms of the user attr val_neg_elbo
        assert trial.values == [trial.user_attrs["val_kl"], trial.user_attrs["val_recon"]]
        assert trial.user_attrs["val_neg_elbo"] == pytest.approx(sum(trial.values), rel=1e-5)
    assert ("sweep.objective rate_distortion: pruning is off (Optuna cannot prune a multi-objective "
            "study)") in done.stderr.splitlines()
    trial_lines = [line for line in done.stderr.splitlines() if line.startswith("trial ")]
    assert len(trial_lines) == 3 and all("on the Pareto front" in line for line in trial_lines), trial_lines
    assert "Warning" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    front = sorted(study.best_trials, key=lambda t: t.values[0])  # by rate
    chosen = min(study.best_trials, key=lambda t: sum(t.values))
    # The Pareto trial with the lowest -ELBO is the lowest of all the complete trials.
    assert sum(chosen.values) == min(sum(t.values) for t in study.trials)

    best = yaml.safe_load((project / "sweeps" / "best_params.yaml").read_text())
    assert best == {"model": {**chosen.params, "hidden_dims": json.loads(chosen.params["hidden_dims"])}}
    assert done.stdout.strip().splitlines()[-1].strip() == dvc_command(best)
    with (project / "sweeps" / "pareto_front.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(row["trial_number"]) for row in rows] == [t.number for t in front]
    assert [float(row["val_kl"]) for row in rows] == [t.values[0] for t in front]

    (parent,) = [r for r in mlflow_runs(project) if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best.trial_number"] == str(chosen.number)
    assert parent.data.metrics["pareto_trials"] == len(front)
    assert "plots/pareto_front.png" in artifact_paths(project, parent.info.run_id, "plots")
    assert {"path": "pareto_front.json", "type": "table"} in json.loads(parent.data.tags["mlflow.loggedArtifacts"])
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    with tempfile.TemporaryDirectory() as dst:
        table = json.loads(Path(client.download_artifacts(parent.info.run_id, "pareto_front.json", dst)).read_text())
    assert table["columns"] == ["trial_number", "val_kl", "val_recon", "val_neg_elbo", "latent_dim", "kl_weight",
                                "hidden_dims", "mlflow_run_id", "trials_finished"]
    assert [[row[0], *row[7:]] for row in table["data"]] == [
        [t.number, t.user_attrs["mlflow_run_id"], 3] for t in front]
    for row, trial in zip(table["data"], front, strict=True):  # log_table's JSON has 10 decimals
        assert row[1:4] + [row[5]] == pytest.approx(
            [*trial.values, trial.user_attrs["val_neg_elbo"], trial.params["kl_weight"]], abs=1e-10)
        assert [row[4], row[6]] == [trial.params["latent_dim"], trial.params["hidden_dims"]]

    # The same study rerun with the default objective: one line, before any training.
    again = run([sys.executable, "pipeline/sweep.py", *SMALL, "--n-trials", "1"], project, check=False)
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        "error: study 'mnist-vae' in sqlite:///sweeps/optuna.db is a rate_distortion study, not neg_elbo: "
        "pass another --study-name for a neg_elbo study, or delete this one (optuna delete-study "
        "--study-name mnist-vae --storage sqlite:///sweeps/optuna.db)"], again.stderr
    assert len(trials(project)) == 3


@pytest.mark.parametrize(("created", "reopened"), [("neg_elbo", "rate_distortion"), ("rate_distortion", "neg_elbo")])
def test_a_study_reopens_only_with_its_own_objective(tmp_path, created, reopened):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"

    def config(objective):
        return load_config(ROOT / "params.yaml", overrides={"sweep.storage": storage, "sweep.objective": objective})

    study, was_created = create_or_open_study(config(created))
    assert was_created and len(study.directions) == {"neg_elbo": 1, "rate_distortion": 2}[created]
    assert create_or_open_study(config(created))[1] is False  # its own objective reopens it
    with pytest.raises(PipelineError) as err:
        create_or_open_study(config(reopened))
    assert str(err.value) == (
        f"study 'mnist-vae' in {storage} is a {created} study, not {reopened}: pass another --study-name "
        f"for a {reopened} study, or delete this one (optuna delete-study --study-name mnist-vae --storage "
        f"{storage})")


def test_a_study_reopens_only_with_its_own_trial_length(tmp_path):
    """Trials of 300 epochs were measured again at 1 and ranked against 40-epoch ones."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"

    def config(max_epochs):
        return load_config(ROOT / "params.yaml", overrides={"sweep.storage": storage, "sweep.max_epochs": max_epochs})

    assert create_or_open_study(config(20))[1] is True
    assert create_or_open_study(config(20))[1] is False
    with pytest.raises(PipelineError) as err:
        create_or_open_study(config(1))
    assert str(err.value) == (f"study 'mnist-vae' in {storage} trains each trial for 20 epochs, not 1: pass "
                              "--max-epochs 20 to go on with it, or another --study-name")
