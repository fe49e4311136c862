"""One study on two machines, the pipeline on a tracking server, data shared through a DVC remote:
real PostgreSQL, a real `mlflow server` and a real Optuna gRPC proxy on 127.0.0.1, started here
and stopped after the module. Two checkouts stand in for two machines."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml

from .conftest import BIN, make_project, run

pytest.importorskip("psycopg", reason="needs the [cluster] extra: pip install -e '.[cluster]'")

pytestmark = pytest.mark.slow  # end to end: the fast tier (pytest -m "not slow" -n 0) skips it
if shutil.which("initdb") is None:
    pytest.skip("needs PostgreSQL's server binaries (initdb, pg_ctl) on PATH", allow_module_level=True)

SWEEP = ["--max-epochs", "1", "--hidden-dims", "[[32], [64, 32]]", "--latent-dim", "[2, 4]",
         "--pruner", "none"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, timeout_s: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited {proc.returncode}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what} did not answer within {timeout_s} s")


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL server on 127.0.0.1; its URL without a database. PostgreSQL refuses to run as
    root, so as root it runs as `nobody`, in a folder nobody owns."""
    as_root = os.geteuid() == 0
    folder = Path(tempfile.mkdtemp(prefix="pg-"))
    if as_root:
        os.chmod(folder, 0o755)
        shutil.chown(folder, "nobody")
    user = {"user": "nobody", "group": "nogroup", "extra_groups": []} if as_root else {}
    env = {**os.environ, "LC_ALL": "C"}
    port = free_port()
    data = folder / "data"
    subprocess.run(["initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True, env=env, cwd=folder, **user)
    subprocess.run(["pg_ctl", "-D", str(data), "-l", str(folder / "log"), "-w", "start", "-o",
                    f"-h 127.0.0.1 -p {port} -k {folder}"],
                   check=True, capture_output=True, env=env, cwd=folder, **user)
    url = f"postgresql://postgres@127.0.0.1:{port}"
    import psycopg

    with psycopg.connect(f"{url}/postgres", autocommit=True) as conn:
        for db in ("optuna", "mlflow"):
            conn.execute(f"CREATE DATABASE {db}")
    yield url
    subprocess.run(["pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True,
                   env=env, cwd=folder, **user)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def tracking_server(postgres, tmp_path_factory) -> Iterator[str]:
    """One `mlflow server` (~50 s to answer on a busy machine: one per module), its backend on
    PostgreSQL, artifacts proxied to a local folder."""
    port = free_port()
    artifacts = tmp_path_factory.mktemp("mlflow-artifacts")
    log = (tmp_path_factory.mktemp("mlflow-log") / "server.log").open("w")
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"{postgres}/mlflow",
                             "--artifacts-destination", artifacts.as_uri(), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200,
                 "mlflow server", 180, proc)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
        log.close()


@pytest.fixture(scope="module")
def grpc_proxy(postgres) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parents[1] / "scripts" / "optuna_grpc_proxy.py"),
                             "--storage", f"{postgres}/optuna", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() is None,
                 "optuna gRPC proxy", 60, proc)
        yield f"grpc://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def server_runs(uri: str) -> list[mlflow.entities.Run]:
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("mnist-vae")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def start_sweep(repo: Path, storage: str, server: str, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": server}
    return subprocess.Popen([sys.executable, "pipeline/sweep.py", *SWEEP, "--storage", storage, *flags],
                            cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_machines_share_one_study(tmp_path, postgres, tracking_server, grpc_proxy):
    storage = f"{postgres}/optuna"
    machines = [make_project(tmp_path / name) for name in ("machine-a", "machine-b")]
    # Both at the same moment, on an empty database: one creates the schema and the study.
    procs = [start_sweep(repo, storage, tracking_server, "--n-trials", "2") for repo in machines]
    outs = [proc.communicate(timeout=400) for proc in procs]
    for proc, (out, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, f"{out}\n{err}"

    study = optuna.load_study(study_name="mnist-vae", storage=storage)
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    best = study.best_trial
    runs = server_runs(tracking_server)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == [0, 1, 2, 3]
    assert parent.info.status == "FINISHED" and all(r.info.status == "FINISHED" for r in children)
    # The closing machine saw every trial: the parent names the study's best trial.
    assert parent.data.tags["best.trial_number"] == str(best.number)
    assert {k: parent.data.tags[f"best.{k}"] for k in best.params} == {k: str(v) for k, v in best.params.items()}
    assert parent.data.metrics["best_val_neg_elbo"] == pytest.approx(best.value)
    history = mlflow.MlflowClient(tracking_server).get_metric_history(parent.info.run_id, "trials_total")
    # Steps grow in the order logged; two machines that saw the same trials at once log the same.
    logged = sorted(history, key=lambda m: m.timestamp)
    assert [m.step for m in logged] == sorted(m.step for m in logged)
    assert len({m.step: m.value for m in logged}) == len({(m.step, m.value) for m in logged})
    # Each machine's rerun line and best_params.yaml name one trial, with only the tuned keys.
    for repo, (out, _) in zip(machines, outs, strict=True):
        written = yaml.safe_load((repo / "sweeps" / "best_params.yaml").read_text())
        assert list(written) == ["model"]
        assert any(written["model"] == {"latent_dim": t.params["latent_dim"], "kl_weight": t.params["kl_weight"],
                                        "hidden_dims": yaml.safe_load(t.params["hidden_dims"])}
                   for t in study.trials)
        assert f"-S 'model.latent_dim={written['model']['latent_dim']}'" in out
        assert "train.max_epochs" not in out
    last = max(machines, key=lambda repo: (repo / "sweeps" / "best_params.yaml").stat().st_mtime)
    assert yaml.safe_load((last / "sweeps" / "best_params.yaml").read_text())["model"]["latent_dim"] == \
        best.params["latent_dim"]

    # A third machine through Optuna's gRPC proxy joins the same study.
    third = start_sweep(machines[0], grpc_proxy, tracking_server, "--n-trials", "1")
    out, err = third.communicate(timeout=300)
    assert third.returncode == 0, f"{out}\n{err}"
    assert sorted(t.number for t in optuna.load_study(study_name="mnist-vae", storage=storage).trials) == \
        [0, 1, 2, 3, 4]

    # A machine logging to its own store stops before training, naming the store it looked in.
    alone = run([sys.executable, "pipeline/sweep.py", *SWEEP, "--storage", storage, "--n-trials", "1"],
                machines[1], check=False)
    store = f"sqlite:///{machines[1] / 'mlruns' / 'mlflow.db'}"
    assert alone.returncode == 2
    assert alone.stderr.strip().splitlines()[-1] == (
        f"error: study 'mnist-vae': its parent MLflow run {parent.info.run_id} is not in the tracking "
        f"store {store}; all machines of a study must log to one tracking server: set "
        "MLFLOW_TRACKING_URI to the one the study's first machine used")
    assert len(optuna.load_study(study_name="mnist-vae", storage=storage).trials) == 5


def test_a_missing_driver_names_the_extra(project):
    result = run([sys.executable, "pipeline/sweep.py", "--storage", "mysql://u:secret@127.0.0.1/db"],
                 project, check=False)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: --storage mysql://...@127.0.0.1/db: its database driver is missing (")
    assert line.endswith("for PostgreSQL install it with pip install -e '.[cluster]'")


def test_a_dead_server_is_one_line_within_30_s(project):
    run(["dvc", "repro", "download"], project)
    started = time.monotonic()
    result = run([sys.executable, "pipeline/train.py"], project, check=False,
                 env_extra={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"})
    # MLflow's own retries take ~4 minutes; ours ~5 s, plus up to ~30 s to import torch and read
    # the data on a busy 2-core machine.
    assert time.monotonic() - started < 50
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]  # after the data's own notes
    assert line.startswith("error: MLflow tracking store http://127.0.0.1:") and "does not answer" in line


def test_pipeline_on_a_server_then_shared_through_a_dvc_remote(project, tracking_server, tmp_path):
    # A run of a machine that died long ago, on another host: the next start closes it.
    client = mlflow.MlflowClient(tracking_server)
    experiment = client.get_experiment_by_name("mnist-vae")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("mnist-vae")
    dead = client.create_run(experiment_id, tags={"process.host": "gone", "process.pid": "1",
                                                  "process.heartbeat": str(int(time.time()) - 16 * 60)})
    server = {"MLFLOW_TRACKING_URI": tracking_server}
    run(["dvc", "repro"], project, env_extra=server)
    assert client.get_run(dead.info.run_id).info.status == "KILLED"
    run_id = yaml.safe_load((project / "models" / "mlflow_run.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.get_metric_history(run_id, "test_iwae_nll")) == 1

    # Pointing at another store: one line naming the store that holds the run.
    other = run(["dvc", "repro", "-f", "-s", "evaluate"], project, check=False,
                env_extra={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'other.db'}"})
    assert other.returncode != 0
    assert (f"MLflow run {run_id} is in the store {tracking_server}, but MLFLOW_TRACKING_URI names "
            f"sqlite:///{tmp_path / 'other.db'}; unset it or set it to {tracking_server}") in other.stderr

    # Without the variable, evaluate reopens the run on the server the train stage used.
    run(["dvc", "repro", "-f", "-s", "evaluate"], project)
    assert len(client.get_metric_history(run_id, "test_iwae_nll")) == 2
    assert not (project / "mlruns").exists()  # no stray local store
    # A second machine: clone, pull, and nothing to recompute.
    remote = tmp_path / "dvc-remote"
    run(["dvc", "remote", "add", "-d", "shared", str(remote)], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "pipeline results"], project)
    run(["dvc", "push"], project)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    run(["dvc", "pull"], clone)
    repro = run(["dvc", "repro"], clone, env_extra=server)
    assert "Running stage" not in repro.stdout and "Data and pipelines are up to date." in repro.stdout
    assert (clone / "models" / "best.ckpt").read_bytes() == (project / "models" / "best.ckpt").read_bytes()
