"""Optuna sweeps over latent_dim, kl_weight and hidden_dims, one MLflow child run per trial.

Each trial is the train stage's `fit()` on the base config with the sampled values replaced. The
objective is the beta-free validation -ELBO: the kl_weight-weighted loss would reward a small
kl_weight for nothing. The study lives in an Optuna storage, so rerunning continues it; a trial
whose process died stops sending heartbeats and is marked FAIL (with its MLflow run KILLED) by the
next run.

Many machines share one study through one storage (PostgreSQL, or Optuna's gRPC proxy in front of
it) and one MLflow tracking server: the machine that creates the study creates its parent run,
the others wait for it; each summarises one snapshot of the study, and the parent run ends
FINISHED when a machine finds no trial of the study still running.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import mlflow
import optuna
import torch
import yaml
from optuna_integration import PyTorchLightningPruningCallback

from . import tracking
from .cli import PipelineError, set_up_process, set_up_torch
from .config import Config
from .files import write_bytes
from .lit import NonFiniteLossError, VaeDataModule
from .paths import Paths
from .train import fit

log = logging.getLogger(__name__)

PARENT_RUN_ATTR = "mlflow_parent_run_id"
CLUSTER_EXTRA = "pip install -e '.[cluster]'"
PARENT_WAIT_S = 60  # how long a joining machine waits for the study's creator to make the parent run


def storage_url(url: str) -> str:
    """Resolve a relative SQLite path from the checkout, as the MLflow store is, and make the
    SQLite file's folder (SQLite creates the file, not its folder)."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        return url
    path = Paths.of().checkout / url[len(prefix):]  # an absolute path stays itself
    path.parent.mkdir(parents=True, exist_ok=True)
    return prefix + str(path)


def _kill_child_run(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    if run_id := trial.user_attrs.get("mlflow_run_id"):
        mlflow.MlflowClient(tracking.tracking_uri()).set_terminated(run_id, status="KILLED")
        log.info("trial %d had died; marked FAIL, its MLflow run KILLED", trial.number)


def check_storage(url: str, named: str = "sweep.storage =") -> None:
    """Fail in one line, before any work, if the storage URL cannot work here: an unknown scheme
    or a missing driver (RDBStorage would say only "Failed to import DB access module").
    `named` is how the user gave it: "--storage" for the flag."""
    shown = f"{named} {_safe(url)}"
    if url.startswith("grpc://"):
        host, _, port = url.removeprefix("grpc://").rstrip("/").rpartition(":")
        if not host or not port.isdigit():
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


def open_storage(cfg: Config) -> optuna.storages.BaseStorage:
    """The study's storage: an RDB URL (with heartbeats), or grpc://host:port for Optuna's proxy."""
    sweep = cfg.sweep
    url = storage_url(sweep.storage)
    check_storage(url)
    if url.startswith("grpc://"):
        return _grpc_storage(url)
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


def _grpc_storage(url: str) -> optuna.storages.BaseStorage:
    host, _, port = url.removeprefix("grpc://").rstrip("/").rpartition(":")
    storage = optuna.storages.GrpcStorageProxy(host=host, port=int(port))
    try:
        storage.wait_server_ready(timeout=30)
    except ConnectionError:
        raise PipelineError(f"sweep.storage = {url}: no Optuna gRPC proxy answers there within 30 s; "
                            "start it with `python scripts/optuna_grpc_proxy.py --storage <RDB URL>`") from None
    return storage


def _pruner(cfg: Config) -> optuna.pruners.BasePruner:
    sweep = cfg.sweep
    if sweep.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=sweep.pruner_startup_trials,
                                           n_warmup_steps=sweep.pruner_warmup_epochs)
    return optuna.pruners.NopPruner()


def open_study(cfg: Config, storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    study = optuna.load_study(study_name=cfg.sweep.study_name, storage=storage or open_storage(cfg),
                              pruner=_pruner(cfg), sampler=optuna.samplers.TPESampler(seed=cfg.sweep.seed))
    optuna.storages.fail_stale_trials(study)
    return study


def join_or_create_study(cfg: Config, experiment_id: str) -> tuple[optuna.Study, str]:
    """The study and its parent run id. The one machine whose create_study succeeds makes the
    parent run and enqueues the baseline; the others find the study and wait for its parent."""
    storage = open_storage(cfg)
    name = cfg.sweep.study_name
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="minimize",
                                    pruner=_pruner(cfg), sampler=optuna.samplers.TPESampler(seed=cfg.sweep.seed))
    except optuna.exceptions.DuplicatedStudyError:
        study = open_study(cfg, storage)
    else:
        parent = mlflow.MlflowClient().create_run(experiment_id, run_name=f"sweep-{name}",
                                                  tags={"optuna.study": name})
        # The first invocation's settings: MLflow params are immutable, and a resumed study may
        # be run with another n_trials.
        mlflow.MlflowClient().log_batch(parent.info.run_id, params=[
            mlflow.entities.Param(k, str(v)) for k, v in cfg.flat().items() if k.startswith("sweep.")])
        _enqueue_baseline(study, cfg)
        study.set_user_attr(PARENT_RUN_ATTR, parent.info.run_id)  # last: joiners wait for it
    deadline = time.monotonic() + PARENT_WAIT_S
    while (parent_run_id := study.user_attrs.get(PARENT_RUN_ATTR)) is None:
        if time.monotonic() > deadline:
            raise PipelineError(f"study {name!r} in {_safe(cfg.sweep.storage)} has no MLflow parent run "
                                f"after {PARENT_WAIT_S} s: its creator died; delete the study "
                                "(optuna delete-study) and start again")
        time.sleep(1)
    _check_parent(parent_run_id, name)
    return study, parent_run_id


def _safe(url: str) -> str:
    """A storage URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}://...@{rest.split('@', 1)[1]}" if "@" in rest else url


def _check_parent(parent_run_id: str, study_name: str) -> None:
    uri = tracking.tracking_uri()
    try:
        mlflow.MlflowClient().get_run(parent_run_id)
    except mlflow.exceptions.MlflowException:
        raise PipelineError(
            f"study {study_name!r}: its parent MLflow run {parent_run_id} is not in the tracking store "
            f"{uri}; all machines of a study must log to one tracking server: set "
            "MLFLOW_TRACKING_URI to the one the study's first machine used") from None


def trial_config(cfg: Config, trial: optuna.Trial) -> Config:
    sweep = cfg.sweep
    # Optuna's categorical choices must be plain scalars, so architectures travel as JSON text.
    hidden = trial.suggest_categorical("hidden_dims", [json.dumps(list(h)) for h in sweep.hidden_dims])
    model = dataclasses.replace(
        cfg.model,
        latent_dim=trial.suggest_int("latent_dim", *sweep.latent_dim),
        kl_weight=trial.suggest_float("kl_weight", *sweep.kl_weight, log=True),
        hidden_dims=tuple(json.loads(hidden)))
    return dataclasses.replace(cfg, model=model,
                               train=dataclasses.replace(cfg.train, max_epochs=sweep.max_epochs))


class Objective:
    """One trial: a child MLflow run under the study's parent, and the one training path."""

    def __init__(self, cfg: Config, parent_run_id: str) -> None:
        self.cfg, self.parent_run_id = cfg, parent_run_id
        self.experiment_id = tracking.use_experiment()
        self.data = VaeDataModule(cfg.data, cfg.train, Paths.of().data)

    def __call__(self, trial: optuna.Trial) -> float:
        cfg = trial_config(self.cfg, trial)
        with mlflow.start_run(experiment_id=self.experiment_id, nested=True,
                              parent_run_id=self.parent_run_id, run_name=f"trial-{trial.number}",
                              tags={"optuna.study": cfg.sweep.study_name,
                                    "optuna.trial_number": str(trial.number),
                                    **tracking.process_tags()}) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            mlflow.log_params({k: v for k, v in cfg.flat().items() if not k.startswith("sweep.")})
            try:
                with tempfile.TemporaryDirectory() as work_dir:
                    result = fit(cfg, self.data, run.info.run_id, work_dir=Path(work_dir),
                                 progress=False,
                                 callbacks=[PyTorchLightningPruningCallback(trial, "val_neg_elbo")])
            except optuna.TrialPruned:
                result = None  # a pruned trial is no failure: its run ends FINISHED
            mlflow.set_tag("optuna.state", "PRUNED" if result is None else "COMPLETE")
        if result is None:
            raise optuna.TrialPruned()
        best = result.best
        for key in ("val_recon", "val_kl"):
            trial.set_user_attr(key, best[key])
        return best["val_neg_elbo"]


def _report(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    done = len(study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]))
    try:
        best = f"best {study.best_value:.2f} (trial {study.best_trial.number})"
    except ValueError:
        best = "no complete trial yet"
    value = f"{trial.value:.2f}" if trial.value is not None else "-"
    log.info("trial %d %s: val_neg_elbo %s | %d complete, %s",
             trial.number, trial.state.name, value, done, best)


def _worker(cfg: Config, n_trials: int, parent_run_id: str, threads: int) -> None:
    set_up_torch(threads)  # torch takes every core per process; workers split them
    set_up_process()  # a spawned worker starts with none of the command's set-up
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours
    study = open_study(cfg)
    study.optimize(Objective(cfg, parent_run_id), n_trials=n_trials, timeout=cfg.sweep.timeout_s,
                   callbacks=[_report], catch=(NonFiniteLossError,))


def run_sweep(cfg: Config) -> optuna.Study:
    """Add cfg.sweep.n_trials trials to the study, in cfg.sweep.workers processes; then summarise
    a snapshot of it into the parent run, and close the parent if no trial is running anywhere."""
    experiment_id = tracking.use_experiment()
    tracking.close_dead_runs(experiment_id)
    study, parent_run_id = join_or_create_study(cfg, experiment_id)
    client = mlflow.MlflowClient()
    if client.get_run(parent_run_id).info.status != "RUNNING":  # a resumed study
        client.update_run(parent_run_id, status="RUNNING")
    workers = cfg.sweep.workers
    shares = [cfg.sweep.n_trials // workers + (i < cfg.sweep.n_trials % workers) for i in range(workers)]
    threads = max(1, (os.cpu_count() or 1) // workers)
    try:
        if workers == 1:
            _worker(cfg, shares[0], parent_run_id, torch.get_num_threads())
        else:
            spawn = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools
            procs = [spawn.Process(target=_worker, args=(cfg, n, parent_run_id, threads))
                     for n in shares if n > 0]
            for proc in procs:
                proc.start()
            for proc in procs:
                proc.join()
        snapshot = snapshot_study(open_study(cfg))
        running = [t.number for t in snapshot.trials if t.state == optuna.trial.TrialState.RUNNING]
        # Only the machine that closes the parent writes its tags and plots: it has seen every
        # trial, and an earlier machine's slower summary cannot overwrite it.
        summarise(snapshot, cfg, Paths.of().sweeps, parent_run_id, to_parent=not running)
    except BaseException:
        client.set_terminated(parent_run_id, status="FAILED")
        raise
    if running:  # another machine's trials: the last machine to finish closes the parent
        log.info("trials %s still run on other machines; the last of them closes the parent run",
                 running)
    else:
        client.set_terminated(parent_run_id, status="FINISHED")
    return snapshot


def snapshot_study(study: optuna.Study) -> optuna.Study:
    """An in-memory copy of the study as it is now: other machines keep adding trials to the
    shared one, and a summary read from it twice could mix two moments."""
    snapshot = optuna.create_study(study_name=study.study_name, direction="minimize")
    snapshot.add_trials(study.get_trials(deepcopy=True))
    for key, value in study.user_attrs.items():
        snapshot.set_user_attr(key, value)
    return snapshot


def _enqueue_baseline(study: optuna.Study, cfg: Config) -> None:
    """Trial 0 of a new study is params.yaml's own model, so every study measures its gain."""
    model, sweep = cfg.model, cfg.sweep
    if (sweep.latent_dim[0] <= model.latent_dim <= sweep.latent_dim[1]
            and sweep.kl_weight[0] <= model.kl_weight <= sweep.kl_weight[1]
            and model.hidden_dims in sweep.hidden_dims):
        study.enqueue_trial({"latent_dim": model.latent_dim, "kl_weight": model.kl_weight,
                             "hidden_dims": json.dumps(list(model.hidden_dims))})


def best_params(study: optuna.Study) -> dict:
    """The tuned keys only: the rerun trains as long as params.yaml says, not the trial budget."""
    params = study.best_params
    return {"model": {"latent_dim": params["latent_dim"], "kl_weight": params["kl_weight"],
                      "hidden_dims": json.loads(params["hidden_dims"])}}


def dvc_command(best: dict) -> str:
    sets = [f"-S '{section}.{key}={json.dumps(value).replace(' ', '')}'"
            for section, values in best.items() for key, value in values.items()]
    return "dvc exp run " + " ".join(sets)


def summarise(snapshot: optuna.Study, cfg: Config, out_dir: Path, parent_run_id: str,
              to_parent: bool = True) -> None:
    """Log the study's numbers to the parent run; write best_params.yaml and, if to_parent, log
    the best trial and the study's plots to the parent. All of it from one snapshot
    (`snapshot_study`), so it names one best trial."""
    client = mlflow.MlflowClient()
    trials = snapshot.trials
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    # Step: the trials finished so far, so that machines summarising one after another log a
    # series; a machine that finds this step logged already (another saw the same trials) skips it.
    step = sum(t.state.is_finished() for t in trials)
    numbers = {"trials_complete": len(complete), "trials_total": len(trials)}
    if complete:
        numbers["best_val_neg_elbo"] = snapshot.best_trial.value
    if step not in {m.step for m in client.get_metric_history(parent_run_id, "trials_total")}:
        client.log_batch(parent_run_id, metrics=_metrics(numbers, step))
    if not complete:
        log.warning("no trial completed; nothing to summarise")
        return
    best_trial = snapshot.best_trial
    best = best_params(snapshot)
    write_bytes(out_dir / "best_params.yaml", yaml.safe_dump(best, sort_keys=False).encode())
    if to_parent:
        # Tags, not params: the best trial changes as a resumed study grows.
        client.log_batch(parent_run_id, tags=[mlflow.entities.RunTag(f"best.{k}", str(v)) for k, v in
                                              {**best_trial.params, "trial_number": best_trial.number}.items()])
        client.log_artifact(parent_run_id, str(out_dir / "best_params.yaml"))
        from .figures import study_plots  # matplotlib only when there is something to draw

        for path in study_plots(snapshot, out_dir):
            client.log_artifact(parent_run_id, str(path), "plots")
    log.info("best trial %d: val_neg_elbo %.2f, %s", best_trial.number, best_trial.value,
             best_trial.params)
    print(f"Rerun the full pipeline with the best trial:\n  {dvc_command(best)}")


def _metrics(values: dict[str, float], step: int) -> list[mlflow.entities.Metric]:
    now = int(time.time() * 1000)
    return [mlflow.entities.Metric(k, float(v), now, step) for k, v in values.items()]
