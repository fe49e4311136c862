"""Hostile and careless use, done for real: every case ends in a one-line error with exit status
2 and no traceback, and leaves the outputs, the run file and the MLflow runs as they were. The
cases, with what the user sees, are the table of docs/reliability.md (tests/test_layout.py keeps
the two in step).

Most cases share one trained tiny project (module scope): each one that changes it puts it back.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from mnist_vae.__main__ import main as cli_main
from mnist_vae.idx import FILES, idx_bytes, read_idx

from .conftest import BIN, copy_project, mlflow_runs, run, tiny_params

pytestmark = pytest.mark.slow  # end to end: the fast tier (pytest -m "not slow" -n 0) skips it

OUTPUTS = ("models/best.ckpt", "models/last.ckpt", "models/mlflow_run.json",
           "metrics/train_history.csv", "metrics/train.json", "metrics/evaluate.json")


@pytest.fixture(scope="module")
def trained(trained_once, tmp_path_factory) -> Path:
    """One project through `dvc repro`: the previous, good run that no failure may touch."""
    project = copy_project(trained_once, tmp_path_factory.mktemp("hardening") / "project")
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "trained"], project)
    return project


def snapshot(project: Path) -> dict[str, str]:
    """sha256 of every output, and the status of every MLflow run."""
    files = {name: hashlib.sha256((project / name).read_bytes()).hexdigest() for name in OUTPUTS}
    return {**files, **{r.info.run_id: r.info.status for r in mlflow_runs(project)}}


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The error line, after asserting exit 2 and no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


def set_params(project: Path, **sections) -> None:
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_params(**sections), sort_keys=False))


@pytest.fixture
def restore(trained):
    """Puts back what a case changed in the shared project (params, files, permissions)."""
    yield trained
    for folder in ("mlruns", "mlruns/artifacts"):
        os.chmod(trained / folder, 0o755)
    run(["git", "checkout", "-q", "--", "params.yaml"], trained)
    run(["dvc", "checkout", "-q", "--force"], trained)
    shutil.rmtree(trained / "checkpoints", ignore_errors=True)


def new_runs(project: Path, before: dict[str, str]) -> list[mlflow.entities.Run]:
    return [r for r in mlflow_runs(project) if r.info.run_id not in before]


# ---------------------------------------------------------------------------------------------
# The evaluate CLI on bad files: in-process, as cheap as a function call

def _text(path: Path, project: Path) -> None:
    path.write_text("hello\n")


def _truncated(path: Path, project: Path) -> None:
    path.write_bytes((project / "models" / "best.ckpt").read_bytes()[:5000])


def _bare_state_dict(path: Path, project: Path) -> None:
    torch.save(torch.load(project / "models" / "best.ckpt", weights_only=True)["state_dict"], path)


def _edited(change):
    def make(path: Path, project: Path) -> None:
        saved = torch.load(project / "models" / "best.ckpt", weights_only=True)
        change(saved)
        torch.save(saved, path)
    return make


def _nan_bias(saved: dict) -> None:
    saved["state_dict"]["vae.mu.bias"][0] = float("nan")


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _malicious(path: Path, project: Path) -> None:
    torch.save({"state_dict": {}, "hyper_parameters": Payload()}, path)


CHECKPOINT_CASES = {
    "text file": (_text, "{p}: empty, truncated or not a PyTorch checkpoint; pass a .ckpt file the train stage wrote"),
    "empty file": (lambda p, _: p.write_bytes(b""), "{p}: empty, truncated or not a PyTorch checkpoint; pass a .ckpt file the train stage wrote"),
    "truncated": (_truncated, "{p}: empty, truncated or not a PyTorch checkpoint; pass a .ckpt file the train stage wrote"),
    "random bytes": (lambda p, _: p.write_bytes(np.random.default_rng(0).bytes(10_000)), "{p}: not a PyTorch checkpoint; pass a .ckpt file the train stage wrote"),
    "bare state_dict": (_bare_state_dict, "{p}: not a Lightning checkpoint of this project (a bare state_dict?); pass a .ckpt file the train stage wrote"),
    "directory": (lambda p, _: p.mkdir(), "{p}: a directory, not a checkpoint file; pass a .ckpt file the train stage wrote, such as models/best.ckpt"),
    "wrong shapes": (_edited(lambda saved: saved["hyper_parameters"].update(latent_dim=5)), "{p}: its weights do not match its hyperparameters (size mismatch for mu.weight: copying a param with shape torch.Size([2, 32]) from checkpoint, the shape in current model is torch.Size([5, 32])); pass a .ckpt file the train stage wrote"),
    # 4 TiB of layers, were they built before the shapes are checked
    "huge layers": (_edited(lambda saved: saved["hyper_parameters"].update(hidden_dims=[2**20, 2**20])), "{p}: its weights do not match its hyperparameters (size mismatch for encoder.0.0.weight: copying a param with shape torch.Size([64, 784]) from checkpoint, the shape in current model is torch.Size([1048576, 784])); pass a .ckpt file the train stage wrote"),
    "NaN weight": (_edited(_nan_bias), "{p}: weight mu.bias is not all finite float32 numbers; pass a .ckpt file the train stage wrote"),
    "malicious pickle": (_malicious, "{p}: refused, it holds more than tensors and plain values (pickled code); load only checkpoints you trust"),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_evaluate_cli_refuses_a_bad_checkpoint_in_one_line(trained, tmp_path, capsys, monkeypatch, case):
    make, message = CHECKPOINT_CASES[case]
    bad = tmp_path / "bad.ckpt"
    make(bad, trained)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["evaluate", "--checkpoint", str(bad), "--images",
                  str(trained / "data" / "t10k-images-idx3-ubyte.gz")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: {message.format(p=bad)}\n"
    assert not (tmp_path / "pwned").exists()


def _corrupt_deflate(project: Path) -> bytes:
    raw = bytearray((project / "data" / "t10k-images-idx3-ubyte.gz").read_bytes())
    raw[100:160] = bytes(60)  # inside the deflate stream, past the gzip header
    return bytes(raw)


IMAGE_CASES = {
    "0 images": (lambda _: bytes([0, 0, 8, 3]) + np.array([0, 28, 28], ">i4").tobytes(),
                 "{p}: images of shape (0, 28, 28); expected (N, 28, 28) with N >= 1, an IDX image file such as data/t10k-images-idx3-ubyte.gz"),
    "bogus ndim": (lambda _: bytes([0, 0, 8, 200]) + bytes(100),
                   "{p}: an IDX header with 200 dimensions; expected 1 (labels) or 3 (images)"),
    "text": (lambda _: b"hello\n", "{p}: not an uint8 IDX file; expected MNIST-format data"),
    "labels, not images": (lambda project: (project / "data" / FILES["test"][1]).read_bytes(),
                           "{p}: images of shape (500,); expected (N, 28, 28) with N >= 1, an IDX image file such as data/t10k-images-idx3-ubyte.gz"),
}


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_evaluate_cli_refuses_bad_images_in_one_line(trained, tmp_path, capsys, case):
    make, message = IMAGE_CASES[case]
    bad = tmp_path / "images.idx"
    bad.write_bytes(make(trained))
    with pytest.raises(SystemExit) as exit_:
        cli_main(["evaluate", "--checkpoint", str(trained / "models" / "best.ckpt"), "--images", str(bad)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: {message.format(p=bad)}\n"


def test_evaluate_cli_names_a_corrupt_deflate_stream(trained, tmp_path, capsys):
    bad = tmp_path / "images.gz"
    bad.write_bytes(_corrupt_deflate(trained))
    with pytest.raises(SystemExit) as exit_:
        cli_main(["evaluate", "--checkpoint", str(trained / "models" / "best.ckpt"), "--images", str(bad)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"error: {re.escape(str(bad))}: unreadable \(.+\); expected an IDX file, "
                        r"gzipped or raw\n", err), err


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size 0: expected an integer >= 1"),
    (["--iwae-samples", "1000000000"], "--iwae-samples 1000000000: expected an integer from 1 to 10,000"),
    (["--batch-size", "abc"], "argument --batch-size: invalid int value: 'abc'"),
    (["--seed", str(2**64)], f"--seed {2**64}: expected an integer from 0 to 2**63 - 1"),
])
def test_evaluate_cli_bounds_its_flags(trained, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["evaluate", "--checkpoint", str(trained / "models" / "best.ckpt"),
                  "--images", str(trained / "data" / "t10k-images-idx3-ubyte.gz"), *flags])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"python -m mnist_vae evaluate: error: {message}\n"  # no usage block


# ---------------------------------------------------------------------------------------------
# The stages on a bad project: subprocesses, as a user runs them

def test_malicious_classifier_is_refused_before_the_run_is_touched(restore):
    project, before = restore, snapshot(restore)
    torch.save({"hidden_dims": [256], "state_dict": Payload()}, project / "classifier" / "classifier.pt")
    result = run([sys.executable, "pipeline/evaluate.py"], project, check=False)
    assert one_line_error(result) == (
        f"error: {project / 'classifier' / 'classifier.pt'}: refused, it holds more than tensors "
        "and plain values (pickled code); load only checkpoints you trust")
    assert snapshot(project) == before and not (project / "pwned").exists()


def test_malicious_last_checkpoint_is_not_resumed(restore):
    project, before = restore, snapshot(restore)
    (project / "checkpoints").mkdir()
    torch.save({"epoch": 1, "state_dict": Payload()}, project / "checkpoints" / "last.ckpt")
    (project / "checkpoints" / "resume.json").write_text('{"run_id": "x", "fingerprint": "y"}')
    result = run([sys.executable, "pipeline/train.py"], project, check=False)
    assert one_line_error(result) == (
        f"error: {project / 'checkpoints' / 'last.ckpt'}: refused to resume from it, it holds "
        f"pickled code (this pipeline never writes that); delete {project / 'checkpoints'} to "
        "train from scratch")
    assert snapshot(project) == before and not (project / "pwned").exists()


GPU = torch.cuda.is_available() or torch.backends.mps.is_available()


@pytest.mark.parametrize("params, message", [
    ({"train": {"lr": float("inf")}}, "params.yaml: train.lr = inf; expected a finite number (fix it in params.yaml or with dvc exp run -S)"),
    ({"model": {"kl_weight": float("inf")}}, "params.yaml: model.kl_weight = inf; expected a finite number (fix it in params.yaml or with dvc exp run -S)"),
    ({"train": {"seed": -5}}, "params.yaml: train.seed = -5; expected an integer from 0 to 4,294,967,295 (fix it in params.yaml or with dvc exp run -S)"),
    ({"model": {"latent_dim": 100000}}, "params.yaml: model.latent_dim = 100000; expected an integer from 1 to 1,024 (fix it in params.yaml or with dvc exp run -S)"),
    pytest.param({"train": {"accelerator": "gpu"}}, "params.yaml: train.accelerator = 'gpu', but this machine has no such device; set train.accelerator: auto (or cpu)",
                 marks=pytest.mark.skipif(GPU, reason="this machine has a GPU")),
    ("", "params.yaml: data and 6 more missing; every key must be set (the project's params.yaml lists them all with their defaults)"),
])
def test_bad_params_stop_training_before_a_run_opens(restore, params, message):
    project, before = restore, snapshot(restore)
    if isinstance(params, dict):
        set_params(project, **params)
    else:
        (project / "params.yaml").write_text(params)
    assert one_line_error(run([sys.executable, "pipeline/train.py"], project, check=False)) == f"error: {message}"
    assert snapshot(project) == before  # no new run, nothing written


def test_nan_loss_keeps_the_previous_model_and_run_file(restore):
    project, before = restore, snapshot(restore)
    set_params(project, train={"lr": 1e30})
    line = one_line_error(run([sys.executable, "pipeline/train.py"], project, check=False))
    assert re.fullmatch(r"error: training loss is nan at epoch 0, step \d+; lower train.lr "
                        r"\(now 1e\+30\) in params.yaml", line), line
    assert [r.info.status for r in new_runs(project, before)] == ["FAILED"]
    assert {k: v for k, v in snapshot(project).items() if k in before} == before
    # The next stage still reads the run that trained models/, not the failed one.
    run([sys.executable, "pipeline/evaluate.py"], project)
    run_id = yaml.safe_load((project / "models" / "mlflow_run.json").read_text())["run_id"]
    assert {r.info.run_id: r.info.status for r in mlflow_runs(project)}[run_id] == "FINISHED"


def limit_file_size(limit_bytes: int):
    """A full disk, for real: writes past limit_bytes fail with EFBIG (SIGXFSZ ignored)."""
    def pre_exec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return pre_exec


def test_full_disk_while_checkpointing_fails_the_run_and_leaves_nothing_partial(restore):
    project, before = restore, snapshot(restore)
    set_params(project, model={"hidden_dims": [512, 256]})  # checkpoints of ~10 MB
    store = (project / "mlruns" / "mlflow.db").stat().st_size
    result = run([sys.executable, "pipeline/train.py"], project, check=False,
                 preexec_fn=limit_file_size(store + 2**21))
    assert one_line_error(result) == ("error: writing a file: File too large; free some disk "
                                      "space (or raise the file-size limit) and rerun")
    assert [r.info.status for r in new_runs(project, before)] == ["FAILED"]
    assert {k: v for k, v in snapshot(project).items() if k in before} == before
    leftovers = [p for folder in ("models", "metrics") for p in (project / folder).iterdir()
                 if p.name.endswith(".tmp")]
    assert leftovers == []


@pytest.mark.parametrize("headroom", [0, 2**13])
def test_full_disk_under_the_mlflow_store_leaves_no_run_finished_or_running(restore, headroom):
    """SQLite fits what it can into free pages, so how far a run gets before a write fails varies
    with the headroom: whatever it managed, the run is never FINISHED (MLflow's exit handler ends
    a run left active FINISHED), and one the dead process could not mark FAILED is marked KILLED
    by the next start."""
    project, before = restore, snapshot(restore)
    result = run([sys.executable, "pipeline/train.py"], project, check=False,
                 preexec_fn=limit_file_size((project / "mlruns" / "mlflow.db").stat().st_size + headroom))
    assert re.fullmatch(r"error: (a SQLite store \(mlruns/ or sweeps/\) cannot be written: disk I/O "
                        r"error|writing a file: File too large); free some disk space \(or raise the "
                        r"file-size limit\) and rerun", one_line_error(result))
    assert {k: v for k, v in snapshot(project).items() if k in before} == before
    run([sys.executable, "pipeline/figures.py"], project)  # the next start
    after = snapshot(project)
    assert {k: v for k, v in after.items() if k in before} == before
    assert {s for k, s in after.items() if k not in before} <= {"FAILED", "KILLED"}


def as_user() -> list[str]:
    """root ignores file modes: drop the capability that lets it, so read-only means read-only."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--"]


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="needs setpriv as root")
def test_read_only_artifact_folder_fails_the_run_and_keeps_the_outputs(restore):
    project, before = restore, snapshot(restore)
    set_params(project, train={"seed": 2})
    os.chmod(project / "mlruns" / "artifacts", 0o555)
    line = one_line_error(run([*as_user(), sys.executable, "pipeline/train.py"], project, check=False))
    (failed,) = new_runs(project, before)
    assert line == (f"error: {project / 'mlruns' / 'artifacts' / failed.info.run_id}: Permission "
                    "denied; make it writable for this user and rerun")
    assert failed.info.status == "FAILED"
    assert {k: v for k, v in snapshot(project).items() if k in before} == before


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="needs setpriv as root")
def test_a_run_the_failing_process_cannot_end_is_killed_by_the_next_start(restore):
    """The store turns read-only mid-training: the process cannot even mark its run FAILED, exits
    with one line, and the next start (any stage) marks the run it left RUNNING as KILLED."""
    project, before = restore, snapshot(restore)
    set_params(project, train={"max_epochs": 100, "batch_size": 32})
    store = project / "mlruns" / "mlflow.db"
    training = subprocess.Popen([*as_user(), sys.executable, "pipeline/train.py"], cwd=project,
                                env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not (project / "checkpoints" / "last.ckpt").exists():  # epoch 0 done
            assert training.poll() is None, training.stderr.read()
            time.sleep(0.05)
        os.chmod(store, 0o444)  # the folder too: SQLite writes its journal beside the file
        os.chmod(project / "mlruns", 0o555)
        _, stderr = training.communicate(timeout=300)
    finally:
        os.chmod(store, 0o644)
        os.chmod(project / "mlruns", 0o755)
    assert one_line_error(subprocess.CompletedProcess([], training.returncode, "", stderr)) == (
        "error: a SQLite store (mlruns/ or sweeps/) cannot be written: attempt to write a "
        "readonly database; make it writable for this user and rerun")
    (left,) = new_runs(project, before)
    assert left.info.status == "RUNNING"
    run([sys.executable, "pipeline/figures.py"], project)  # the next start
    after = snapshot(project)
    assert after[left.info.run_id] == "KILLED"
    assert {k: v for k, v in after.items() if k in before} == before


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="needs setpriv as root")
def test_read_only_store_is_one_line(restore):
    project, before = restore, snapshot(restore)
    os.chmod(project / "mlruns", 0o555)
    line = one_line_error(run([*as_user(), sys.executable, "pipeline/evaluate.py"], project, check=False))
    assert line == ("error: a SQLite store (mlruns/ or sweeps/) cannot be written: attempt to write "
                    "a readonly database; make it writable for this user and rerun") or \
        line.startswith(f"error: {project / 'mlruns'}"), line
    assert snapshot(project) == before


def test_evaluate_after_the_store_was_deleted(restore):
    project = restore
    run_id = yaml.safe_load((project / "models" / "mlflow_run.json").read_text())["run_id"]
    shutil.move(project / "mlruns", project.parent / "mlruns.aside")
    try:
        line = one_line_error(run([sys.executable, "pipeline/evaluate.py"], project, check=False))
    finally:
        shutil.rmtree(project / "mlruns", ignore_errors=True)
        shutil.move(project.parent / "mlruns.aside", project / "mlruns")
    assert line == (f"error: {project / 'models' / 'mlflow_run.json'}: MLflow run {run_id} is not in "
                    f"the store sqlite:///{project / 'mlruns' / 'mlflow.db'} (deleted or moved?); "
                    "run `dvc repro -f train` to train and record a new run")


def test_evaluate_and_figures_refuse_a_run_that_did_not_finish(restore):
    project = restore
    run_id = yaml.safe_load((project / "models" / "mlflow_run.json").read_text())["run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    client.set_tag(run_id, "training.finished", "false")  # as a run from before this rule
    client.set_terminated(run_id, status="FAILED")
    try:
        for stage in ("evaluate", "figures"):
            line = one_line_error(run([sys.executable, f"pipeline/{stage}.py"], project, check=False))
            assert line == (f"error: {project / 'models' / 'mlflow_run.json'}: MLflow run {run_id} is "
                            "FAILED, not FINISHED: its training did not complete; run `dvc repro -f train`")
        assert client.get_run(run_id).info.status == "FAILED"
    finally:
        client.set_tag(run_id, "training.finished", "true")
        client.set_terminated(run_id, status="FINISHED")


def test_a_failing_evaluate_leaves_the_training_run_finished(restore):
    """A stage that fails after reopening the run does not lock the user out of retrying it."""
    project = restore
    run_id = yaml.safe_load((project / "models" / "mlflow_run.json").read_text())["run_id"]
    data = project / "data" / "source.json"
    data.write_text("[1, 2]")  # read by evaluate inside the reopened run
    line = one_line_error(run([sys.executable, "pipeline/evaluate.py"], project, check=False))
    assert line.startswith(f"error: {data}: unreadable or not what download writes")
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FINISHED"


# ---------------------------------------------------------------------------------------------
# One training per checkout

def test_a_second_training_stops_at_once_naming_the_live_one(project):
    set_params(project, model={"hidden_dims": [256, 128]}, train={"max_epochs": 100, "batch_size": 32})
    run(["dvc", "repro", "download"], project)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    first = subprocess.Popen([sys.executable, "pipeline/train.py"], cwd=project, env=env,
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (project / "checkpoints" / "last.ckpt").exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        started = time.monotonic()
        second = run([sys.executable, "pipeline/train.py"], project, check=False)
        assert first.poll() is None, "the first training ended: the test proves nothing"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert one_line_error(second) == (
        f"error: another training is running in this checkout (pid {first.pid} on host "
        f"{socket.gethostname()}, holding {project / '.train.lock'}); wait for it to end or stop "
        "it, then rerun")
    assert time.monotonic() - started < 60  # at once: no data read, no run opened
    (only,) = mlflow_runs(project)  # the second opened none
    assert only.info.status == "RUNNING"  # the first's, until a later start finds it dead


# ---------------------------------------------------------------------------------------------
# Download and sweep flags

def test_download_from_a_local_folder_with_missing_labels(project, tmp_path):
    run(["dvc", "repro", "download"], project)
    folder = tmp_path / "local"
    folder.mkdir()
    for name in (*FILES["train"], *FILES["test"]):
        array = read_idx(project / "data" / name)
        if name == FILES["train"][1]:
            array = array[:-7]
        (folder / name).write_bytes(gzip.compress(idx_bytes(array)))
    set_params(project, data={"source": "local", "local_dir": str(folder)})
    result = run([sys.executable, "pipeline/download.py"], project, check=False)
    assert one_line_error(result) == (f"error: {folder}: 4500 train images but labels of shape "
                                      "(4493,); expected one label per image")


@pytest.mark.parametrize("flags, message", [
    (["--n-trials", "0"], "--n-trials 0: expected an integer from 1 to 100,000 (fix the flag)"),
    (["--storage", "foo"], "--storage 'foo': expected an Optuna storage URL such as sqlite:///sweeps/optuna.db (fix the flag)"),
    (["--storage", "foo://bar"], "--storage foo://bar: not a database URL (Can't load plugin: sqlalchemy.dialects:foo); expected e.g. sqlite:///sweeps/optuna.db, postgresql://user:pass@host/db or grpc://host:port"),
    (["--latent-dim", "[2.5, 4]"], "--latent-dim [2.5, 4]: its item [0] is 2.5; expected an integer (fix the flag)"),
    (["--study-name", ""], "--study-name None: expected a string (fix the flag)"),  # was: the default study
])
def test_sweep_flag_errors_name_the_flag(trained, flags, message):
    result = run([sys.executable, "pipeline/sweep.py", *flags], trained, check=False)
    assert one_line_error(result) == f"error: {message}"
    assert not (trained / "sweeps").exists()
