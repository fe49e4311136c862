"""Optuna sweeps over latent_dim, kl_weight and hidden_dims, one MLflow child run per trial.

Each trial is the train stage's `fit()` on the base config with the sampled values replaced. The
objective is the beta-free validation -ELBO: the kl_weight-weighted loss would reward a small
kl_weight for nothing. The study lives in an Optuna storage (study.py), so rerunning continues
it; a trial whose process died stops sending heartbeats and is marked FAIL (with its MLflow run
KILLED) by the next run. Each machine summarises one snapshot of the study when it is done.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import optuna
import torch
import yaml
from optuna_integration import PyTorchLightningPruningCallback

from . import tracking
from .config import Config
from .errors import Stopped
from .files import write_bytes
from .lit import NonFiniteLossError, VaeDataModule
from .paths import Paths
from .process import set_up_process, set_up_torch, stop_on_signals, stopping
from .study import (
    STOPPED_BY,
    create_or_open_study,
    create_parent_run,
    enqueue_baseline,
    open_study,
    requeue_stopped,
    snapshot_study,
    wait_for_parent_run,
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

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            return self._measure(trial)
        except Stopped as stop:
            trial.set_user_attr(STOPPED_BY, stop.name)  # Optuna marks it FAIL; requeue_stopped
            raise

    def _measure(self, trial: optuna.Trial) -> float:
        cfg = trial_config(self.cfg, trial)
        with mlflow.start_run(experiment_id=self.experiment_id, nested=True,
                              parent_run_id=self.parent_run_id, run_name=f"trial-{trial.number}",
                              tags={"optuna.study": cfg.sweep.study_name,
                                    "optuna.trial_number": str(trial.number),
                                    **tracking.process_tags()}) as run, tracking.killed_if_stopped():
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            mlflow.log_params(tracking.run_params(cfg))
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


def _quiet_stops(record: logging.LogRecord) -> bool:
    # Optuna logs a failed trial's traceback and its value; a stop is no failure of the code.
    return not stopping()


def _report(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    done = len(study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]))
    try:
        best = f"best {study.best_value:.2f} (trial {study.best_trial.number})"
    except ValueError:
        best = "no complete trial yet"
    value = f"{trial.value:.2f}" if trial.value is not None else "-"
    log.info("trial %d %s (%s): val_neg_elbo %s | %d complete, %s",
             trial.number, trial.state.name, shown_params(trial.params), value, done, best)


def shown_params(params: dict) -> str:
    """A trial's params for a log line: kl_weight to 3 significant digits, not 2.1300008180604357."""
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())


def _worker(cfg: Config, n_trials: int, parent_run_id: str, threads: int) -> None:
    study = open_study(cfg)
    study.optimize(Objective(cfg, parent_run_id), n_trials=n_trials, timeout=cfg.sweep.timeout_s,
                   callbacks=[_report], catch=(NonFiniteLossError,))


def _spawned_worker(cfg: Config, n_trials: int, parent_run_id: str, threads: int) -> None:
    set_up_torch(threads)  # torch takes every core per process; workers split them
    set_up_process()  # a spawned worker starts with none of the command's set-up
    stop_on_signals()
    _quiet_optuna()
    try:
        _worker(cfg, n_trials, parent_run_id, threads)
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
    tracking.close_dead_runs(experiment_id)
    study, created = create_or_open_study(cfg)
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
            _worker(cfg, shares[0], parent_run_id, torch.get_num_threads())
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


def has_complete_trial(study: optuna.Study) -> bool:
    return any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def best_params(study: optuna.Study) -> dict:
    """The tuned keys only: the rerun trains as long as params.yaml says, not the trial budget."""
    params = study.best_params
    return {"model": {"latent_dim": params["latent_dim"], "kl_weight": params["kl_weight"],
                      "hidden_dims": json.loads(params["hidden_dims"])}}


def dvc_command(best: dict) -> str:
    sets = [f"-S '{section}.{key}={json.dumps(value).replace(' ', '')}'"
            for section, values in best.items() for key, value in values.items()]
    return "dvc exp run " + " ".join(sets)


def log_study_numbers(snapshot: optuna.Study, parent_run_id: str) -> None:
    """Trials complete and total, and the best value, with step = the trials finished so far, so
    that machines summarising one after another log a series; a machine that finds this step
    logged already (another saw the same trials) skips it."""
    client = mlflow.MlflowClient()
    trials = snapshot.trials
    step = sum(t.state.is_finished() for t in trials)
    if step in {m.step for m in client.get_metric_history(parent_run_id, "trials_total")}:
        return
    numbers = {"trials_complete": sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials),
               "trials_total": len(trials)}
    if has_complete_trial(snapshot):
        numbers["best_val_neg_elbo"] = snapshot.best_value
    now = int(time.time() * 1000)
    client.log_batch(parent_run_id, metrics=[mlflow.entities.Metric(k, tracking.metric_value(v), now, step)
                                             for k, v in numbers.items()])


def write_best_params(snapshot: optuna.Study, out_dir: Path) -> None:
    """sweeps/best_params.yaml and the printed line that reruns the pipeline with the best trial."""
    best_trial, best = snapshot.best_trial, best_params(snapshot)
    write_bytes(out_dir / "best_params.yaml", yaml.safe_dump(best, sort_keys=False).encode())
    log.info("best trial %d: val_neg_elbo %.2f (%s)", best_trial.number, best_trial.value,
             shown_params(best_trial.params))
    print(f"Rerun the full pipeline with the best trial:\n  {dvc_command(best)}")


def summarise_to_parent(snapshot: optuna.Study, parent_run_id: str, out_dir: Path) -> None:
    """The best trial as tags (not params: it changes as a resumed study grows), best_params.yaml
    and the study's plots, into the parent run."""
    client = mlflow.MlflowClient()
    best_trial = snapshot.best_trial
    client.log_batch(parent_run_id, tags=[mlflow.entities.RunTag(f"best.{k}", str(v)) for k, v in
                                          {**best_trial.params, "trial_number": best_trial.number}.items()])
    client.log_artifact(parent_run_id, str(out_dir / "best_params.yaml"))
    from .figures import study_plots  # matplotlib only when there is something to draw

    for path in study_plots(snapshot, out_dir):
        client.log_artifact(parent_run_id, str(path), "plots")
