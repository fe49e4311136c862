"""MLflow: where the store lives, and one run per pipeline execution across its stages.

The train stage opens the run and, once training has finished, records its id in the run file
(models/mlflow_run.json, a DVC output); counterpart, evaluate and figures reopen it from there.
All logging is explicit: `mlflow.pytorch.autolog` does not patch the `lightning` namespace.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from filelock import FileLock
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource

from . import liveness, stores
from .config import Config
from .errors import PipelineError, Stopped
from .files import FileRefusedError, read_json_file
from .idx import DataSource
from .paths import Paths

log = logging.getLogger(__name__)

EXPERIMENT = "mnist-vae"
# Set by the train stage once models/ is ready to publish: the training itself succeeded, even
# if a later stage that reopened the run was killed and the run marked KILLED.
TRAINING_FINISHED_TAG = "training.finished"


def default_tracking_uri() -> str:
    return f"sqlite:///{Paths.of().mlruns / 'mlflow.db'}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def use_experiment(name: str = EXPERIMENT, uri: str | None = None) -> str:
    """Point MLflow at the project's store, or `uri` (before any other MLflow call: MLflow 3's own
    default is ./mlflow.db in the current directory) and return the experiment's id, creating it.
    The store's kind follows the URI's scheme: a `sqlite:` file is ours to create (locked, its
    artifacts beside it); anything else (`http(s):`, a database) is a server's, which makes its
    schema and artifact root itself."""
    uri = uri or tracking_uri()
    check_store(uri)
    mlflow.set_tracking_uri(uri)
    if not uri.startswith("sqlite:"):
        try:
            return _get_or_create_experiment(name, artifact_location=None)
        except mlflow.exceptions.MlflowException as err:
            first = str(err).strip().splitlines()[0][:200]
            raise PipelineError(f"MLflow tracking store {uri} does not answer ({first}); start the "
                                "server, or set MLFLOW_TRACKING_URI to one that runs") from None
    store = Path(uri.removeprefix("sqlite:///")).resolve().parent
    store.mkdir(parents=True, exist_ok=True)
    # Two stages starting at once (`dvc queue start -j 2`) would both create the SQLite schema;
    # the loser's migration fails. One at a time, the second finds it made.
    with FileLock(store / ".create.lock"):
        return _get_or_create_experiment(name, artifact_location=(store / "artifacts").as_uri())


def check_store(uri: str | None = None) -> None:
    """Before any work: a store that cannot hold runs (`sqlite:///` with no path, a damaged
    database file, a server that does not answer), or a SQLite store whose recorded artifact
    folder is another checkout's (this one moved or copied), in one line with the fix."""
    uri = uri or tracking_uri()
    stores.check_tracking_uri(uri)
    if uri.startswith("sqlite:"):
        db = Path(uri.removeprefix("sqlite:///")).resolve()
        stores.check_store_location(db, db.parent / "artifacts")


def _get_or_create_experiment(name: str, artifact_location: str | None) -> str:
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException:  # another process created it first
        return mlflow.get_experiment_by_name(name).experiment_id


def has_run(run_id: str) -> bool:
    try:
        mlflow.MlflowClient(tracking_uri()).get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    return True


def recorded_tracking_uri() -> str | None:
    """What the run file records of the store: None for the checkout's own, so that a moved or
    copied checkout reads its own store, not the one at the old place."""
    uri = tracking_uri()
    return None if uri == default_tracking_uri() else uri


@contextmanager
def pipeline_run(cfg: Config, resume_run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Open the pipeline's run (train stage), or reopen an interrupted one. It ends FINISHED, or
    FAILED if the block raises."""
    experiment = use_experiment()
    liveness.close_dead_runs(experiment)
    # The experiment's kind, for MLflow's API and any UI that reads it. MLflow 3.17's sidebar does
    # not: it follows its GenAI / Model training switch, kept in the browser (docs/ui.md).
    mlflow.MlflowClient().set_experiment_tag(experiment, "mlflow.experimentKind", "custom_model_development")
    if resume_run_id is not None:
        run = mlflow.start_run(run_id=resume_run_id, tags=liveness.process_tags(), log_system_metrics=True)
    else:
        run = mlflow.start_run(experiment_id=experiment, run_name=run_name(cfg),
                               tags={**liveness.process_tags(), GROUP_TAG: config_group(cfg)},
                               log_system_metrics=True)
    # Everything after start_run inside `with run`: a run still active when an error ends the
    # process is ended FINISHED by MLflow's exit handler (seen with a full disk under SQLite).
    with run, killed_if_stopped():
        if resume_run_id is None:
            mlflow.log_params(run_params(cfg))
        yield run


@contextmanager
def killed_if_stopped() -> Iterator[None]:
    """Within an MLflow run's `with`: a stop by a signal ends the run KILLED, as MLflow's UI
    calls a run that was stopped (its `with` would say FAILED)."""
    try:
        yield
    except Stopped:
        mlflow.end_run("KILLED")
        raise


@contextmanager
def continue_run(run_file: Path) -> Iterator[mlflow.ActiveRun]:
    """Reopen the run the train stage recorded (counterpart, evaluate and figures stages), in the
    store the train stage used, only if its training finished. It ends FINISHED even if the stage
    fails: its status is the training's, and a retry of the stage must find it so; KILLED if a
    signal stopped the stage (a retry finds its training finished by the tag)."""
    try:
        recorded = read_json_file(run_file, "the run file the train stage writes",
                                  {"run_id": str, "tracking_uri": str | None})
    except FileRefusedError as err:
        raise PipelineError(f"{run_file}: no MLflow run id ({err.reason}); run `dvc repro train` first") from None
    run_id = recorded["run_id"]
    # None: the checkout's own store, wherever the checkout is now (it may have moved).
    uri = recorded.get("tracking_uri") or tracking_uri()
    if uri.startswith("sqlite:") and not Path(uri.removeprefix("sqlite:///")).exists():
        uri = tracking_uri()  # a run file of an older version, naming the store where it was
    if (env := os.environ.get("MLFLOW_TRACKING_URI")) and env != uri:
        raise PipelineError(f"{run_file}: MLflow run {run_id} is in the store {uri}, but "
                            f"MLFLOW_TRACKING_URI names {env}; unset it or set it to {uri}")
    liveness.close_dead_runs(use_experiment(uri=uri))
    try:
        found = mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise PipelineError(f"{run_file}: MLflow run {run_id} is not in the store {uri} "
                            "(deleted or moved?); run `dvc repro -f train` to train and record "
                            "a new run") from None
    status = found.info.status
    if status != "FINISHED" and found.data.tags.get(TRAINING_FINISHED_TAG) != "true":
        raise PipelineError(f"{run_file}: MLflow run {run_id} is {status}, not FINISHED: its "
                            "training did not complete; run `dvc repro -f train`")
    run = mlflow.start_run(run_id=run_id, tags=liveness.process_tags())
    try:
        with killed_if_stopped():
            yield run
    finally:
        mlflow.end_run("FINISHED")  # unless it ended KILLED


def log_data_source(source: DataSource, context: str) -> None:
    """Record where the data came from and the sha256 of each file, as an MLflow dataset input."""
    dataset = MetaDataset(LocalArtifactDatasetSource(source.origin), name=source.dataset,
                          digest=source.digest)
    tags = {"source": source.source, **{f"sha256.{name}": sha for name, sha
                                         in source.sha256_decompressed.items()}}
    mlflow.log_input(dataset, context=context, tags=tags)
    mlflow.set_tags({"data.source": source.source, "data.origin": source.origin,
                     "data.comparable_with_full_dataset": str(source.comparable_with_full_dataset)})


# Values fixed by the config or the data, not measurements: tags, so the metrics tab charts
# only what was measured (metrics/*.json keep them beside the metrics).
CONSTANTS = ("epochs", "best_epoch", "iwae_samples", "n_test")


def run_name(cfg: Config) -> str:
    """The DVC experiment's name when there is one, else e.g. `vae-z2-5b91248` (kind, latent
    size, the commit it ran on)."""
    if exp_name := os.environ.get("DVC_EXP_NAME"):
        return exp_name
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Paths.of().root,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return "-".join(filter(None, [cfg.model.kind, f"z{cfg.model.latent_dim}", commit]))


GROUP_TAG = "config.group"


def config_group(cfg: Config) -> str:
    """The run's config without train.seed, hashed: runs that differ only in their seed share it,
    so MLflow's "Group by" this tag shows each config's mean and spread over seeds."""
    params = {k: v for k, v in run_params(cfg).items() if k != "train.seed"}
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_params(cfg: Config) -> dict[str, object]:
    """What configures a training run; `sweep.*` configures the sweep, whose parent run has them."""
    return {k: v for k, v in cfg.flat().items() if not k.startswith("sweep.")}


# Significant digits a metric keeps in MLflow: its UI prints the stored double whole, so a float32
# loss reads 158.52334594726562. Seven is float32's precision; metrics/*.json keep every digit.
METRIC_DIGITS = 7


def metric_value(value: float) -> float:
    """`value` as MLflow should store it: 158.52334594726562 -> 158.5233 (nan and inf kept)."""
    return float(f"{float(value):.{METRIC_DIGITS}g}")


def log_results(values: dict[str, float], model_id: str | None = None) -> None:
    """Measurements as metrics of the active run, and of its logged model `model_id` if given (the
    experiment's Models tab lists them; mlflow.search_logged_models ranks by them); the CONSTANTS
    among them as tags."""
    mlflow.log_metrics({k: metric_value(v) for k, v in values.items() if k not in CONSTANTS},
                       model_id=model_id)
    mlflow.set_tags({k: v for k, v in values.items() if k in CONSTANTS})
