"""What a sweep leaves behind, from one snapshot of its study: sweeps/best_params.yaml and the line
that reruns the pipeline with the best trial, and in the parent MLflow run the study's numbers,
the best trial's tags and the study's plots."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import mlflow
import optuna
import yaml

from . import tracking
from .files import write_bytes

log = logging.getLogger("mnist_vae.sweep")  # the name its lines had in sweep.py


def shown_params(params: dict) -> str:
    """A trial's params for a log line: kl_weight to 3 significant digits, not 2.1300008180604357."""
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())


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
    from .study_plots import study_plots  # matplotlib only when there is something to draw

    for path in study_plots(snapshot, out_dir):
        client.log_artifact(parent_run_id, str(path), "plots")
