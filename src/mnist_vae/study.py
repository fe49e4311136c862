"""Where a study lives and how machines share it: the Optuna storage (an RDB URL with
heartbeats, or Optuna's gRPC proxy), creating or joining the study, and the parent-run handshake.

Many machines share one study through one storage (PostgreSQL, or the gRPC proxy in front of it)
and one MLflow tracking server: the machine whose create_study succeeds creates the study's parent
run and records its id in the study last; the others wait for that id, then check that their
tracking store holds the run.
"""

from __future__ import annotations

import json
import logging
import time

import mlflow
import optuna

from . import stores, tracking
from .config import Config, ConfigError
from .errors import PipelineError
from .paths import Paths

log = logging.getLogger(__name__)

PARENT_RUN_ATTR = "mlflow_parent_run_id"
CLUSTER_EXTRA = "pip install -e '.[cluster]'"
PARENT_WAIT_S = 60  # how long a joining machine waits for the study's creator to make the parent run
# What each sweep.objective minimises: a trial's values, in order, named so in the study.
OBJECTIVES = {"neg_elbo": ["val_neg_elbo"], "rate_distortion": ["val_kl", "val_recon"]}
SQLITE = "sqlite:///"
GRPC = "grpc://"
STOPPED_BY = "stopped_by"  # a trial's user attribute: the signal that stopped it
MAX_EPOCHS = "max_epochs"  # a study's user attribute: how long each of its trials trains


def storage_url(url: str) -> str:
    """Resolve a relative SQLite path from the checkout, as the MLflow store is, and make the
    SQLite file's folder (SQLite creates the file, not its folder)."""
    if not url.startswith(SQLITE):
        return url
    path = Paths.of().checkout / url[len(SQLITE):]  # an absolute path stays itself
    path.parent.mkdir(parents=True, exist_ok=True)
    return SQLITE + str(path)


def grpc_address(url: str) -> tuple[str, int] | None:
    """(host, port) of a grpc://host:port URL; None if it is not of that form."""
    host, _, port = url.removeprefix(GRPC).rstrip("/").rpartition(":")
    return (host, int(port)) if host and port.isdigit() else None


def safe(url: str) -> str:
    """A storage URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}://...@{rest.split('@', 1)[1]}" if "@" in rest else url


def check_storage(url: str, named: str = "sweep.storage =") -> None:
    """Fail in one line, before any work, if the storage URL cannot work here: an unknown scheme
    or a missing driver (RDBStorage would say only "Failed to import DB access module").
    `named` is how the user gave it: "--storage" for the flag."""
    shown = f"{named} {safe(url)}"
    if url.startswith(GRPC):
        if grpc_address(url) is None:
            raise PipelineError(f"{shown}: expected grpc://host:port")
        try:
            import grpc  # noqa: F401  (the proxy client needs it)
        except ImportError:
            raise PipelineError(f"{shown}: Optuna's gRPC proxy client needs grpcio; "
                                f"install it with {CLUSTER_EXTRA}") from None
        return
    import sqlalchemy

    try:
        sqlalchemy.engine.make_url(storage_url(url)).get_dialect().import_dbapi()
    except ImportError as err:
        raise PipelineError(f"{shown}: its database driver is missing ({err}); "
                            f"for PostgreSQL install it with {CLUSTER_EXTRA}") from None
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError) as err:
        raise PipelineError(f"{shown}: not a database URL ({err}); expected e.g. "
                            "sqlite:///sweeps/optuna.db, postgresql://user:pass@host/db or grpc://host:port") from None
    stores.check_database_url(url, named, relative_to=Paths.of().checkout)


def open_storage(cfg: Config) -> optuna.storages.BaseStorage:
    sweep = cfg.sweep
    url = storage_url(sweep.storage)
    check_storage(url)
    if url.startswith(GRPC):
        return _grpc_storage(url, *grpc_address(url))
    import sqlalchemy

    # Machines started together on an empty database race to create Optuna's schema (a duplicate
    # CREATE TYPE or version row); the loser retries and finds the schema made.
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=sweep.heartbeat_s, grace_period=3 * sweep.heartbeat_s,
                heartbeat_stale_trial_callback=_kill_child_run)
        except sqlalchemy.exc.DBAPIError:
            if attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def _grpc_storage(url: str, host: str, port: int) -> optuna.storages.BaseStorage:
    storage = optuna.storages.GrpcStorageProxy(host=host, port=port)
    try:
        storage.wait_server_ready(timeout=30)
    except ConnectionError:
        raise PipelineError(f"sweep.storage = {url}: no Optuna gRPC proxy answers there within 30 s; "
                            "start it with `python scripts/optuna_grpc_proxy.py --storage <RDB URL>`") from None
    return storage


def _kill_child_run(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    if run_id := trial.user_attrs.get("mlflow_run_id"):
        mlflow.MlflowClient(tracking.tracking_uri()).set_terminated(run_id, status="KILLED")
        log.info("trial %d had died; marked FAIL, its MLflow run KILLED", trial.number)


def _search(cfg: Config) -> dict:
    """How the study proposes and stops trials, the same wherever it is opened."""
    sweep = cfg.sweep
    # Optuna cannot prune a multi-objective study (Trial.report raises): rate_distortion runs
    # every trial to its end.
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=sweep.pruner_startup_trials,
                                          n_warmup_steps=sweep.pruner_warmup_epochs)
              if sweep.pruner == "median" and sweep.objective == "neg_elbo" else optuna.pruners.NopPruner())
    return {"pruner": pruner, "sampler": optuna.samplers.TPESampler(seed=sweep.seed)}


def open_study(cfg: Config, storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    study = optuna.load_study(study_name=cfg.sweep.study_name, storage=storage or open_storage(cfg),
                              **_search(cfg))
    check_study(study, cfg)
    optuna.storages.fail_stale_trials(study)
    return study


def _directions(objective: str) -> list[optuna.study.StudyDirection]:
    return [optuna.study.StudyDirection.MINIMIZE] * len(OBJECTIVES[objective])


def check_study(study: optuna.Study, cfg: Config) -> None:
    """Fail in one line, before any training, if the study minimises another objective than
    sweep.objective (Optuna would take the trials' values, one or two, for the study's own), or
    trains its trials for another sweep.max_epochs (their values would be ranked together)."""
    sweep, name = cfg.sweep, study.study_name
    if study.directions != _directions(sweep.objective):
        held = next((f"a {o} study" for o in OBJECTIVES if study.directions == _directions(o)),
                    f"a study with directions {[d.name.lower() for d in study.directions]}")
        raise PipelineError(
            f"study {name!r} in {safe(sweep.storage)} is {held}, not {sweep.objective}: pass another "
            f"--study-name for a {sweep.objective} study, or delete this one (optuna delete-study "
            f"--study-name {name} --storage {safe(sweep.storage)})")
    if (epochs := study.user_attrs.get(MAX_EPOCHS, sweep.max_epochs)) != sweep.max_epochs:
        raise PipelineError(f"study {name!r} in {safe(sweep.storage)} trains each trial for {epochs} "
                            f"epochs, not {sweep.max_epochs}: pass --max-epochs {epochs} to go on with "
                            "it, or another --study-name")


def create_or_open_study(cfg: Config) -> tuple[optuna.Study, bool]:
    """The study, and whether this call created it: of machines starting together, one does."""
    storage = open_storage(cfg)
    try:
        study = optuna.create_study(study_name=cfg.sweep.study_name, storage=storage,
                                    directions=_directions(cfg.sweep.objective), **_search(cfg))
    except optuna.exceptions.DuplicatedStudyError:
        return open_study(cfg, storage), False
    study.set_metric_names(OBJECTIVES[cfg.sweep.objective])  # optuna-dashboard's and the plots' axes
    study.set_user_attr(MAX_EPOCHS, cfg.sweep.max_epochs)
    return study, True


def create_parent_run(study: optuna.Study, cfg: Config, experiment_id: str) -> None:
    """The creator's half of the handshake: the parent run, recorded in the study last."""
    client = mlflow.MlflowClient()
    parent = client.create_run(experiment_id, run_name=f"sweep-{study.study_name}", tags={
        "optuna.study": study.study_name, "run.kind": "sweep",
        # The run's description in MLflow's UI, so the parent stands apart from pipeline runs.
        "mlflow.note.content": f"Optuna study `{study.study_name}`: one child run per trial, the best "
                               f"trial in the best.* tags, the study's plots under plots/."})
    # The first invocation's settings: MLflow params are immutable, and a resumed study may be
    # run with another n_trials.
    client.log_batch(parent.info.run_id, params=[
        mlflow.entities.Param(k, str(v)) for k, v in cfg.flat().items() if k.startswith("sweep.")])
    study.set_user_attr(PARENT_RUN_ATTR, parent.info.run_id)


def wait_for_parent_run(study: optuna.Study, cfg: Config) -> str:
    """The parent run's id, once its creator has recorded it, checked to be in this store."""
    deadline = time.monotonic() + PARENT_WAIT_S
    while (parent_run_id := study.user_attrs.get(PARENT_RUN_ATTR)) is None:
        if time.monotonic() > deadline:
            raise PipelineError(f"study {study.study_name!r} in {safe(cfg.sweep.storage)} has no MLflow "
                                f"parent run after {PARENT_WAIT_S} s: its creator died; delete the study "
                                "(optuna delete-study) and start again")
        time.sleep(1)  # user_attrs reads the storage each time
    try:
        mlflow.MlflowClient().get_run(parent_run_id)
    except mlflow.exceptions.MlflowException:
        raise PipelineError(
            f"study {study.study_name!r}: its parent MLflow run {parent_run_id} is not in the tracking "
            f"store {tracking.tracking_uri()}; all machines of a study must log to one tracking "
            "server: set MLFLOW_TRACKING_URI to the one the study's first machine used") from None
    return parent_run_id


def snapshot_study(study: optuna.Study) -> optuna.Study:
    """An in-memory copy of the study as it is now: other machines keep adding trials to the
    shared one, and a summary read from it twice could mix two moments."""
    snapshot = optuna.create_study(study_name=study.study_name, directions=study.directions)
    if len(study.directions) > 1 and study.metric_names:
        # A multi-objective study's importances are named by them; a single objective's plots
        # are given their axis name.
        snapshot.set_metric_names(study.metric_names)
    snapshot.add_trials(study.get_trials(deepcopy=True))
    for key, value in study.user_attrs.items():
        snapshot.set_user_attr(key, value)
    return snapshot


def enqueue_baseline(study: optuna.Study, cfg: Config) -> None:
    """Trial 0 of a new study is params.yaml's own model, so every study measures its gain."""
    model, sweep = cfg.model, cfg.sweep
    if (sweep.latent_dim[0] <= model.latent_dim <= sweep.latent_dim[1]
            and sweep.kl_weight[0] <= model.kl_weight <= sweep.kl_weight[1]
            and model.hidden_dims in sweep.hidden_dims):
        study.enqueue_trial({"latent_dim": model.latent_dim, "kl_weight": model.kl_weight,
                             "hidden_dims": json.dumps(list(model.hidden_dims))})


def requeue_stopped(study: optuna.Study) -> None:
    """Enqueue again the params of each trial a signal stopped, unless a trial with them is
    waiting, running or finished: a resumed study measures what it was measuring (the baseline
    trial 0 among them) instead of leaving a hole where the stop came."""
    trials = study.get_trials(deepcopy=False)
    measured = [t.params or t.system_attrs.get("fixed_params") for t in trials
                if t.state != optuna.trial.TrialState.FAIL]
    for trial in trials:
        if STOPPED_BY in trial.user_attrs and trial.params not in measured:
            study.enqueue_trial(trial.params)
            measured.append(trial.params)
            log.info("trial %d was stopped by %s: its params are measured again", trial.number,
                     trial.user_attrs[STOPPED_BY])


def check_sweepable(cfg: Config, path: str = "params.yaml") -> None:
    """What the sweep needs of the rest of params.yaml: a VAE (or IWAE), one device per trial."""
    if not cfg.model.variational:
        raise ConfigError(f"{path}: model.kind = {cfg.model.kind!r}; the sweep tunes a VAE (its kl_weight "
                          "and ELBO), set model.kind: vae or iwae")
    if (devices := cfg.train.devices * cfg.train.num_nodes) > 1:
        raise ConfigError(f"{path}: train.devices * train.num_nodes = {devices}; the sweep trains "
                          "each trial on one device (run trials in parallel with --workers N), set "
                          "train.devices: 1 and train.num_nodes: 1")
