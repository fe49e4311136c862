"""Optuna sweeps over latent_dim, kl_weight and hidden_dims, one MLflow child run per trial.

Each trial is the train stage's `fit()` on the base config with the sampled values replaced. The
objective is the beta-free validation -ELBO: the kl_weight-weighted loss would reward a small
kl_weight for nothing. With sweep.objective rate_distortion the study minimises its two terms
together, rate (val_kl) and distortion (val_recon), and finds their Pareto front. The study lives
in an Optuna storage (study.py), so rerunning continues it; a trial whose process died stops
sending heartbeats and is marked FAIL (with its MLflow run KILLED) by the next run, and a trial a
signal stopped is marked FAIL at once and measured again by the next run. Each machine
summarises one snapshot of the study when it is done (study_summary.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import sys
import tempfile
from pathlib import Path

import mlflow
import optuna
from optuna_integration import PyTorchLightningPruningCallback

from . import liveness, tracking
from .config import Config
from .errors import Stopped
from .lit import NonFiniteLossError, VaeDataModule
from .paths import Paths
from .process import set_up_process, set_up_torch, stop_on_signals, stopping
from .study import (
    OBJECTIVES,
    STOPPED_BY,
    create_or_open_study,
    create_parent_run,
    enqueue_baseline,
    open_study,
    requeue_stopped,
    snapshot_study,
    wait_for_parent_run,
)
from .study_summary import (
    has_complete_trial,
    is_multi_objective,
    log_study_numbers,
    shown_params,
    summarise_to_parent,
    write_best_params,
)
from .train import fit

log = logging.getLogger(__name__)


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

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        try:
            return self._measure(trial)
        except Stopped as stop:
            trial.set_user_attr(STOPPED_BY, stop.name)  # Optuna marks it FAIL; requeue_stopped
            raise

    def _measure(self, trial: optuna.Trial) -> float | tuple[float, float]:
        cfg = trial_config(self.cfg, trial)
        single = cfg.sweep.objective == "neg_elbo"
        # Optuna cannot prune a multi-objective trial (Trial.report raises).
        pruning = [PyTorchLightningPruningCallback(trial, "val_neg_elbo")] if single else []
        with mlflow.start_run(experiment_id=self.experiment_id, nested=True,
                              parent_run_id=self.parent_run_id, run_name=f"trial-{trial.number}",
                              tags={"optuna.study": cfg.sweep.study_name,
                                    "optuna.trial_number": str(trial.number),
                                    **liveness.process_tags()}) as run, tracking.killed_if_stopped():
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            mlflow.log_params(tracking.run_params(cfg))
            try:
                with tempfile.TemporaryDirectory() as work_dir:
                    result = fit(cfg, self.data, run.info.run_id, work_dir=Path(work_dir),
                                 progress=False,
                                 callbacks=pruning)
            except optuna.TrialPruned:
                result = None  # a pruned trial is no failure: its run ends FINISHED
            mlflow.set_tag("optuna.state", "PRUNED" if result is None else "COMPLETE")
        if result is None:
            raise optuna.TrialPruned()
        best = result.best
        for key in ("val_recon", "val_kl"):
            trial.set_user_attr(key, best[key])
        if single:
            return best["val_neg_elbo"]
        trial.set_user_attr("val_neg_elbo", best["val_neg_elbo"])  # for the tables
        return best["val_kl"], best["val_recon"]


def _quiet_stops(record: logging.LogRecord) -> bool:
    # Optuna logs a failed trial's traceback and its value; a stop is no failure of the code.
    return not stopping()


def _report(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    done = len(study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]))
    if is_multi_objective(study):  # no one best trial: the front's size
        names = OBJECTIVES["rate_distortion"]
        values = "-" if trial.values is None else ", ".join(
            f"{name} {value:.2f}" for name, value in zip(names, trial.values, strict=True))
        log.info("trial %d %s (%s): %s | %d complete, %d on the Pareto front", trial.number, trial.state.name,
                 shown_params(trial.params), values, done, len(study.best_trials))
        return
    try:
        best = f"best {study.best_value:.2f} (trial {study.best_trial.number})"
    except ValueError:
        best = "no complete trial yet"
    value = f"{trial.value:.2f}" if trial.value is not None else "-"
    log.info("trial %d %s (%s): val_neg_elbo %s | %d complete, %s",
             trial.number, trial.state.name, shown_params(trial.params), value, done, best)


def _worker(cfg: Config, n_trials: int, parent_run_id: str) -> None:
    study = open_study(cfg)
    study.optimize(Objective(cfg, parent_run_id), n_trials=n_trials, timeout=cfg.sweep.timeout_s,
                   callbacks=[_report], catch=(NonFiniteLossError,))


def _spawned_worker(cfg: Config, n_trials: int, parent_run_id: str, threads: int) -> None:
    set_up_torch(threads)  # torch takes every core per process; workers split them
    set_up_process()  # a spawned worker starts with none of the command's set-up
    stop_on_signals()
    _quiet_optuna()
    try:
        _worker(cfg, n_trials, parent_run_id)
    except Stopped as stop:  # its trial is marked; the parent process says it
        sys.exit(stop.exit_status)


def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours
    for handler in logging.getLogger("optuna").handlers:
        handler.addFilter(_quiet_stops)


def run_sweep(cfg: Config) -> optuna.Study:
    """Add cfg.sweep.n_trials trials to the study, in cfg.sweep.workers processes; then summarise
    a snapshot of it, and close the parent run if no trial is running anywhere."""
    _quiet_optuna()
    experiment_id = tracking.use_experiment()
    liveness.close_dead_runs(experiment_id)
    study, created = create_or_open_study(cfg)
    if cfg.sweep.objective == "rate_distortion":
        log.info("sweep.objective rate_distortion: pruning is off (Optuna cannot prune a "
                 "multi-objective study)")
    if created:
        enqueue_baseline(study, cfg)
        create_parent_run(study, cfg, experiment_id)  # last: joiners wait for it
    else:
        requeue_stopped(study)
    parent_run_id = wait_for_parent_run(study, cfg)
    client = mlflow.MlflowClient()
    if client.get_run(parent_run_id).info.status != "RUNNING":  # a resumed study
        client.update_run(parent_run_id, status="RUNNING")
    workers = cfg.sweep.workers
    shares = [cfg.sweep.n_trials // workers + (i < cfg.sweep.n_trials % workers) for i in range(workers)]
    threads = max(1, (os.cpu_count() or 1) // workers)
    procs = []
    try:
        if workers == 1:
            _worker(cfg, shares[0], parent_run_id)
        else:
            spawn = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools
            procs = [spawn.Process(target=_spawned_worker, args=(cfg, n, parent_run_id, threads))
                     for n in shares if n > 0]
            for proc in procs:
                proc.start()
            for proc in procs:
                proc.join()
        snapshot = snapshot_study(open_study(cfg))
        running = [t.number for t in snapshot.trials if t.state == optuna.trial.TrialState.RUNNING]
        log_study_numbers(snapshot, parent_run_id)
        if has_complete_trial(snapshot):
            out_dir = Paths.of().sweeps
            write_best_params(snapshot, out_dir)
            # Only the machine that closes the parent writes its tags and plots: it has seen
            # every trial, and an earlier machine's slower summary cannot overwrite it.
            if not running:
                summarise_to_parent(snapshot, parent_run_id, out_dir)
        else:
            log.warning("no trial completed; nothing to summarise")
    except Stopped as stop:
        for proc in procs:  # a signal to the sweep's process stops its workers too
            proc.terminate()
            proc.join()
        client.set_terminated(parent_run_id, status="KILLED")
        stop.line = (f"sweep stopped by {stop.name}; its trials in flight are marked FAIL and "
                     "measured again when you rerun the same command")
        raise
    except BaseException:
        client.set_terminated(parent_run_id, status="FAILED")
        raise
    if running:  # another machine's trials: the last machine to finish closes the parent
        log.info("trials %s still run on other machines; the last of them closes the parent run",
                 running)
    else:
        client.set_terminated(parent_run_id, status="FINISHED")
    return snapshot
