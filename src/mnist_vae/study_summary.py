"""What a sweep leaves behind, from one snapshot of its study: sweeps/best_params.yaml and the line
that reruns the pipeline with the best trial, and in the parent MLflow run the study's numbers,
the best trial's tags and the study's plots. A rate-distortion study has no one best trial: its
best is the Pareto trial with the lowest -ELBO, and its Pareto front is written beside
best_params.yaml (sweeps/pareto_front.csv) and as a table in the parent run."""

from __future__ import annotations

import csv
import io
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


def is_multi_objective(study: optuna.Study) -> bool:
    return len(study.directions) > 1


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The study's best trial; of a rate-distortion study, the Pareto trial with the lowest
    -ELBO (rate + distortion), which is also the lowest of all its complete trials: a trial that
    another dominates has a larger sum."""
    if not is_multi_objective(study):
        return study.best_trial
    return min(study.best_trials, key=lambda t: (sum(t.values), t.number))


def pareto_front(study: optuna.Study) -> dict[str, list]:
    """A rate-distortion study's Pareto trials by rate, as columns; trials_finished says which
    snapshot of a growing study it is."""
    front = sorted(study.best_trials, key=lambda t: (t.values[0], t.number))
    finished = sum(t.state.is_finished() for t in study.trials)
    return {"trial_number": [t.number for t in front],
            "val_kl": [t.values[0] for t in front], "val_recon": [t.values[1] for t in front],
            "val_neg_elbo": [t.user_attrs.get("val_neg_elbo") for t in front],
            **{key: [t.params[key] for t in front] for key in ("latent_dim", "kl_weight", "hidden_dims")},
            "mlflow_run_id": [t.user_attrs.get("mlflow_run_id") for t in front],
            "trials_finished": [finished] * len(front)}


def best_params(study: optuna.Study) -> dict:
    """The tuned keys only: the rerun trains as long as params.yaml says, not the trial budget."""
    params = best_trial(study).params
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
    if has_complete_trial(snapshot) and is_multi_objective(snapshot):
        numbers["pareto_trials"] = len(snapshot.best_trials)
        numbers["best_val_neg_elbo"] = sum(best_trial(snapshot).values)
    elif has_complete_trial(snapshot):
        numbers["best_val_neg_elbo"] = snapshot.best_value
    now = int(time.time() * 1000)
    client.log_batch(parent_run_id, metrics=[mlflow.entities.Metric(k, tracking.metric_value(v), now, step)
                                             for k, v in numbers.items()])


def write_best_params(snapshot: optuna.Study, out_dir: Path) -> None:
    """sweeps/best_params.yaml and the printed line that reruns the pipeline with the best trial;
    for a rate-distortion study, sweeps/pareto_front.csv beside them."""
    best, params = best_trial(snapshot), best_params(snapshot)
    write_bytes(out_dir / "best_params.yaml", yaml.safe_dump(params, sort_keys=False).encode())
    if is_multi_objective(snapshot):
        write_bytes(out_dir / "pareto_front.csv", _csv_bytes(pareto_front(snapshot)))
        log.info("Pareto front of %d trials in %s; the lowest -ELBO is trial %d: val_kl %.2f + "
                 "val_recon %.2f = %.2f (%s)", len(snapshot.best_trials), out_dir / "pareto_front.csv",
                 best.number, *best.values, sum(best.values), shown_params(best.params))
    else:
        log.info("best trial %d: val_neg_elbo %.2f (%s)", best.number, best.value, shown_params(best.params))
    print(f"Rerun the full pipeline with the best trial:\n  {dvc_command(params)}")


def _csv_bytes(columns: dict[str, list]) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(zip(*columns.values(), strict=True))
    return text.getvalue().encode()


def summarise_to_parent(snapshot: optuna.Study, parent_run_id: str, out_dir: Path) -> None:
    """The best trial as tags (not params: it changes as a resumed study grows), best_params.yaml
    and the study's plots, into the parent run; a rate-distortion study's Pareto front as a table
    (pareto_front.json, floats to 10 decimals; log_table appends, so a resumed study's fronts
    follow one another, told apart by trials_finished)."""
    client = mlflow.MlflowClient()
    best = best_trial(snapshot)
    client.log_batch(parent_run_id, tags=[mlflow.entities.RunTag(f"best.{k}", str(v)) for k, v in
                                          {**best.params, "trial_number": best.number}.items()])
    client.log_artifact(parent_run_id, str(out_dir / "best_params.yaml"))
    if is_multi_objective(snapshot):
        client.log_table(parent_run_id, data=pareto_front(snapshot), artifact_file="pareto_front.json")
    from .study_plots import study_plots  # matplotlib only when there is something to draw

    for path in study_plots(snapshot, out_dir):
        client.log_artifact(parent_run_id, str(path), "plots")
