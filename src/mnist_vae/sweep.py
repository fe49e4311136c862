"""Optuna sweeps over latent_dim, kl_weight and hidden_dims, one MLflow child run per trial.

Each trial is the train stage's `fit()` on the base config with the sampled values replaced. The
objective is the beta-free validation -ELBO: the kl_weight-weighted loss would reward a small
kl_weight for nothing. The study lives in an Optuna storage, so rerunning continues it; a trial
whose process died stops sending heartbeats and is marked FAIL (with its MLflow run KILLED) by the
next run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import tempfile
from pathlib import Path

import mlflow
import optuna
import torch
import yaml
from optuna_integration import PyTorchLightningPruningCallback

from . import tracking
from .cli import set_up_process
from .config import Config
from .files import write_bytes
from .lit import NonFiniteLossError, VaeDataModule
from .paths import Paths
from .train import fit

log = logging.getLogger(__name__)

PARENT_RUN_ATTR = "mlflow_parent_run_id"


def storage_url(url: str) -> str:
    """Resolve a relative SQLite path from the checkout, as the MLflow store is."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url[len(prefix):].startswith("/"):
        path = Paths.of().checkout / url[len(prefix):]
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    return url


def _kill_child_run(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    if run_id := trial.user_attrs.get("mlflow_run_id"):
        mlflow.MlflowClient(tracking.tracking_uri()).set_terminated(run_id, status="KILLED")
        log.info("trial %d had died; marked FAIL, its MLflow run KILLED", trial.number)


def open_study(cfg: Config) -> optuna.Study:
    sweep = cfg.sweep
    storage = optuna.storages.RDBStorage(
        storage_url(sweep.storage), heartbeat_interval=sweep.heartbeat_s,
        grace_period=3 * sweep.heartbeat_s, heartbeat_stale_trial_callback=_kill_child_run)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=sweep.pruner_startup_trials,
                                         n_warmup_steps=sweep.pruner_warmup_epochs) \
        if sweep.pruner == "median" else optuna.pruners.NopPruner()
    study = optuna.create_study(study_name=sweep.study_name, storage=storage, direction="minimize",
                                pruner=pruner, sampler=optuna.samplers.TPESampler(seed=sweep.seed),
                                load_if_exists=True)
    optuna.storages.fail_stale_trials(study)
    return study


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
    torch.set_num_threads(threads)  # torch takes every core per process; workers split them
    set_up_process()  # a spawned worker starts with none of the command's set-up
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours
    study = open_study(cfg)
    study.optimize(Objective(cfg, parent_run_id), n_trials=n_trials, timeout=cfg.sweep.timeout_s,
                   callbacks=[_report], catch=(NonFiniteLossError,))


def run_sweep(cfg: Config) -> optuna.Study:
    """Add cfg.sweep.n_trials trials to the study, in cfg.sweep.workers processes."""
    study = open_study(cfg)
    experiment_id = tracking.use_experiment()
    tracking.close_dead_runs(experiment_id)
    parent_run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if parent_run_id is None:
        parent = mlflow.MlflowClient().create_run(
            experiment_id, run_name=f"sweep-{study.study_name}",
            tags={"optuna.study": study.study_name})
        parent_run_id = parent.info.run_id
        study.set_user_attr(PARENT_RUN_ATTR, parent_run_id)
        # The first invocation's settings: MLflow params are immutable, and a resumed study may
        # be run with another n_trials.
        mlflow.log_params({k: v for k, v in cfg.flat().items() if k.startswith("sweep.")},
                          run_id=parent_run_id)
        _enqueue_baseline(study, cfg)
    workers = cfg.sweep.workers
    shares = [cfg.sweep.n_trials // workers + (i < cfg.sweep.n_trials % workers) for i in range(workers)]
    threads = max(1, (os.cpu_count() or 1) // workers)
    with mlflow.start_run(run_id=parent_run_id, tags=tracking.process_tags()):
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
        study = open_study(cfg)
        summarise(study, cfg, Paths.of().sweeps)
    return study


def _enqueue_baseline(study: optuna.Study, cfg: Config) -> None:
    """Trial 0 of a new study is params.yaml's own model, so every study measures its gain."""
    model, sweep = cfg.model, cfg.sweep
    if (sweep.latent_dim[0] <= model.latent_dim <= sweep.latent_dim[1]
            and sweep.kl_weight[0] <= model.kl_weight <= sweep.kl_weight[1]
            and model.hidden_dims in sweep.hidden_dims):
        study.enqueue_trial({"latent_dim": model.latent_dim, "kl_weight": model.kl_weight,
                             "hidden_dims": json.dumps(list(model.hidden_dims))})


def best_params(study: optuna.Study, cfg: Config) -> dict:
    params = study.best_params
    return {"model": {"latent_dim": params["latent_dim"], "kl_weight": params["kl_weight"],
                      "hidden_dims": json.loads(params["hidden_dims"])},
            "train": {"max_epochs": cfg.sweep.max_epochs}}


def dvc_command(best: dict) -> str:
    sets = [f"-S '{section}.{key}={json.dumps(value).replace(' ', '')}'"
            for section, values in best.items() for key, value in values.items()]
    return "dvc exp run " + " ".join(sets)


def summarise(study: optuna.Study, cfg: Config, out_dir: Path) -> None:
    """Log the best trial and the study's plots to the parent run; write best_params.yaml."""
    complete = study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])
    mlflow.log_metrics({"trials_complete": len(complete), "trials_total": len(study.trials)})
    if not complete:
        log.warning("no trial completed; nothing to summarise")
        return
    best = best_params(study, cfg)
    mlflow.log_metric("best_val_neg_elbo", study.best_value, step=len(study.trials))
    # Tags, not params: the best trial changes as a resumed study grows.
    mlflow.set_tags({f"best.{k}": v for k, v in study.best_params.items()})
    write_bytes(out_dir / "best_params.yaml", yaml.safe_dump(best, sort_keys=False).encode())
    mlflow.log_artifact(str(out_dir / "best_params.yaml"))
    from .figures import study_plots  # matplotlib only when there is something to draw

    for path in study_plots(study, out_dir):
        mlflow.log_artifact(str(path), "plots")
    log.info("best trial %d: val_neg_elbo %.2f, %s", study.best_trial.number, study.best_value,
             study.best_params)
    print(f"Rerun the full pipeline with the best trial:\n  {dvc_command(best)}")
