"""Crashes and bad input, done for real: SIGKILL mid-training and mid-sweep, NaN losses, bad params."""

import os
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pytest
import torch
import yaml

from mnist_vae.tracking import EXPERIMENT

from .conftest import BIN, metric_steps, mlflow_runs, pipeline_runs, run, tiny_params

pytestmark = pytest.mark.slow  # end to end: the fast tier (pytest -m "not slow" -n 0) skips it


def set_params(project, **sections):
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_params(**sections), sort_keys=False))


def start(cmd, project, capture=False):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    return subprocess.Popen(cmd, cwd=project, env=env, start_new_session=True, stdout=out,
                            stderr=out, text=True)


def wait_for(proc, ready, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert proc.poll() is None, "finished before it could be stopped"
        assert time.monotonic() < deadline, "never got there"
        time.sleep(0.05)


def kill_when(proc, ready, timeout_s=120):
    wait_for(proc, ready, timeout_s)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def finished_epochs(checkpoint):
    try:
        return torch.load(checkpoint, weights_only=True)["epoch"] + 1
    except Exception:  # not written yet, or being replaced
        return 0


def test_a_killed_autoencoder_resumes_with_one_value_per_epoch(project):
    # The AE logs no val_neg_elbo: a resume must not re-log an epoch of what it does log.
    set_params(project, model={"kind": "ae", "hidden_dims": [256, 128]},
               train={"max_epochs": 6, "batch_size": 32})
    run(["dvc", "repro", "download"], project)
    proc = start([sys.executable, "pipeline/train.py"], project)
    kill_when(proc, lambda: finished_epochs(project / "checkpoints" / "last.ckpt") >= 2)
    run([sys.executable, "pipeline/train.py"], project)
    (only,) = pipeline_runs(project)
    assert only.info.status == "FINISHED" and int(only.data.tags["resumed_from_epoch"]) >= 1
    for key in ("train_loss", "val_loss", "val_recon"):
        assert metric_steps(project, only.info.run_id, key) == list(range(6)), key
    assert "val_neg_elbo" not in only.data.metrics


def test_changed_params_start_fresh_instead_of_resuming(project):
    set_params(project, model={"hidden_dims": [256, 128]}, train={"max_epochs": 6, "batch_size": 32})
    run(["dvc", "repro", "download"], project)
    proc = start([sys.executable, "pipeline/train.py"], project)
    kill_when(proc, lambda: finished_epochs(project / "checkpoints" / "last.ckpt") >= 1)
    set_params(project, model={"hidden_dims": [256, 128]}, train={"max_epochs": 2, "batch_size": 32})
    result = run([sys.executable, "pipeline/train.py"], project)
    assert "starting fresh" in result.stderr
    runs = pipeline_runs(project)
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]
    assert not any("resumed_from_epoch" in r.data.tags for r in runs)


def test_an_interrupted_training_of_another_store_is_not_resumed(project, tmp_path):
    """Its run is not in the store now named: resuming it raised MLflow's "Run ... not found"."""
    set_params(project, model={"hidden_dims": [256, 128]}, train={"max_epochs": 4, "batch_size": 32})
    run(["dvc", "repro", "download"], project)
    proc = start([sys.executable, "pipeline/train.py"], project)
    kill_when(proc, lambda: finished_epochs(project / "checkpoints" / "last.ckpt") >= 1)
    other = f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    result = run([sys.executable, "pipeline/train.py"], project, env_extra={"MLFLOW_TRACKING_URI": other})
    assert "which is not in the store" in result.stderr and "starting fresh" in result.stderr
    client = mlflow.MlflowClient(other)
    (fresh,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert fresh.info.status == "FINISHED" and "resumed_from_epoch" not in fresh.data.tags


def test_nan_loss_fails_the_run_and_names_the_fix(project):
    set_params(project, train={"lr": 1e30, "max_epochs": 3})
    run(["dvc", "repro", "download"], project)
    result = run([sys.executable, "pipeline/train.py"], project, check=False)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training loss is nan at epoch ") and "lower train.lr" in last
    (only,) = pipeline_runs(project)
    assert only.info.status == "FAILED"


def trial_running(storage: str) -> bool:
    """Whether the sweep's study has a trial running that has opened its MLflow run."""
    try:
        study = optuna.load_study(study_name="mnist-vae", storage=storage)
    except Exception:  # storage or study not created yet
        return False
    return any(t.state == optuna.trial.TrialState.RUNNING and "mlflow_run_id" in t.user_attrs
               for t in study.trials)


def test_killed_sweep_fails_the_dead_trial_and_continues(project):
    flags = ["--hidden-dims", "[[256, 128]]", "--heartbeat-s", "1", "--pruner", "none"]
    proc = start([sys.executable, "pipeline/sweep.py", "--n-trials", "3", "--max-epochs", "30", *flags],
                 project)
    storage = f"sqlite:///{project / 'sweeps' / 'optuna.db'}"

    kill_when(proc, lambda: trial_running(storage))
    time.sleep(4)  # past the grace period of 3 heartbeats
    run([sys.executable, "pipeline/sweep.py", "--n-trials", "1", "--max-epochs", "30", *flags], project)
    trials = optuna.load_study(study_name="mnist-vae", storage=storage).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    statuses = {r.data.tags.get("optuna.trial_number"): r.info.status for r in mlflow_runs(project)}
    assert statuses["0"] == "KILLED" and statuses["1"] == "FINISHED"
    assert "RUNNING" not in statuses.values()
