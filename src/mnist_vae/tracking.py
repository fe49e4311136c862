"""MLflow: where the store lives, and one run per pipeline execution across its stages.

The train stage opens the run and records its id in RUN_FILE (a DVC output); evaluate and figures
reopen it from there. All logging is explicit: `mlflow.pytorch.autolog` does not patch the
`lightning` namespace.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import mlflow
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource

from .config import Config, PipelineError
from .files import write_json

EXPERIMENT = "mnist-vae"
RUN_FILE = Path("models/mlflow_run.json")
DVC_TEMP_COPIES = (".dvc", "tmp", "exps")  # where `dvc exp run --queue/--temp` runs a stage


def project_root() -> Path:
    """The checkout that owns `mlruns/` and `sweeps/`, also from inside DVC's temp copies.

    DVC runs queued experiments in <root>/.dvc/tmp/exps/<tmpdir>/, a copy without git-ignored
    files; a store resolved from there would be thrown away with the copy.
    """
    here = Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    for path in (here, *here.parents):
        if path.parent.parts[-3:] == DVC_TEMP_COPIES:
            return path.parents[3]
    return here


def default_tracking_uri() -> str:
    return f"sqlite:///{project_root() / 'mlruns' / 'mlflow.db'}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def use_experiment(name: str = EXPERIMENT) -> str:
    """Point MLflow at the project's store (before any other MLflow call: MLflow 3's own default
    is ./mlflow.db in the current directory) and return the experiment's id, creating it."""
    # Like DVC's analytics (off in .dvc/config): no phoning home from offline machines.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # A server chooses its own artifact root; our default store keeps them beside the db,
    # not under the current directory (a DVC temp copy, for queued experiments).
    location = (project_root() / "mlruns" / "artifacts").as_uri() if uri == default_tracking_uri() else None
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # another process created it first
        return mlflow.get_experiment_by_name(name).experiment_id


def run_tags() -> dict[str, str]:
    tags = {}
    if exp_name := os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = exp_name
    return tags


@contextmanager
def pipeline_run(cfg: Config, run_file: Path = RUN_FILE) -> Iterator[mlflow.ActiveRun]:
    """Open the pipeline's run (train stage): params and tags logged, its id written to run_file.

    The run ends FINISHED, or FAILED if the block raises; later stages reopen it.
    """
    with mlflow.start_run(experiment_id=use_experiment(), run_name=os.environ.get("DVC_EXP_NAME"),
                          tags=run_tags()) as run:
        mlflow.log_params(cfg.flat())
        write_json(run_file, {"run_id": run.info.run_id, "tracking_uri": tracking_uri()})
        yield run


@contextmanager
def continue_run(run_file: Path = RUN_FILE) -> Iterator[mlflow.ActiveRun]:
    """Reopen the run the train stage recorded (evaluate and figures stages)."""
    try:
        run_id = json.loads(run_file.read_text())["run_id"]
    except (OSError, ValueError, KeyError) as err:
        raise PipelineError(f"{run_file}: no MLflow run id ({err}); run `dvc repro train` first") from None
    use_experiment()
    with mlflow.start_run(run_id=run_id) as run:
        yield run


def log_data_source(source: dict, context: str) -> None:
    """Record where the data came from and the sha256 of each file, as an MLflow dataset input."""
    files = "".join(sorted(source["sha256_decompressed"].values()))
    dataset = MetaDataset(LocalArtifactDatasetSource(source["origin"]), name=source["dataset"],
                          digest=hashlib.sha256(files.encode()).hexdigest()[:32])
    tags = {"source": source["source"], **{f"sha256.{name}": sha for name, sha
                                            in source["sha256_decompressed"].items()}}
    mlflow.log_input(dataset, context=context, tags=tags)
    mlflow.set_tags({"data.source": source["source"], "data.origin": source["origin"],
                     "data.comparable_with_full_dataset": str(source["comparable_with_full_dataset"])})


class EpochMetricsLogger(L.Callback):
    """Logs every epoch's metrics to an MLflow run with step = epoch, in one batch per epoch."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        mlflow.log_metrics(metrics, step=trainer.current_epoch, run_id=self.run_id)
