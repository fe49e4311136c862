"""Where the project's files live: one rule for every stage, test and benchmark.

Every path is resolved from the project root: the nearest folder holding dvc.yaml, from the
current directory upwards (DVC runs a stage in its workspace, which may be a temp copy; DVC_ROOT
would name the original checkout instead). The stores of MLflow and
Optuna belong to the checkout that owns that root: DVC runs queued experiments in copies under
<checkout>/.dvc/tmp/exps/, without git-ignored files, and a store kept there would be thrown away
with the copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DVC_TEMP_COPIES = (".dvc", "tmp", "exps")  # where `dvc exp run --queue/--temp` runs a stage


def find_root(start: Path | str | None = None) -> Path:
    here = Path(start or Path.cwd()).resolve()
    for path in (here, *here.parents):
        if (path / "dvc.yaml").exists():
            return path
    return here


@dataclass(frozen=True)
class Paths:
    root: Path

    @classmethod
    def of(cls, start: Path | str | None = None) -> Paths:
        return cls(find_root(start))

    @property
    def checkout(self) -> Path:
        """The git checkout that owns the stores, also from inside DVC's temp copies."""
        for path in (self.root, *self.root.parents):
            if path.parent.parts[-3:] == DVC_TEMP_COPIES:
                return path.parents[3]
        return self.root

    # What the pipeline reads and writes, each declared in dvc.yaml.
    params = property(lambda self: self.root / "params.yaml")
    data = property(lambda self: self.root / "data")
    models = property(lambda self: self.root / "models")
    run_file = property(lambda self: self.root / "models" / "mlflow_run.json")
    classifier = property(lambda self: self.root / "classifier" / "classifier.pt")
    counterpart = property(lambda self: self.root / "counterpart")
    figures = property(lambda self: self.root / "figures")
    metrics = property(lambda self: self.root / "metrics")
    history = property(lambda self: self.root / "metrics" / "train_history.csv")
    # Git-ignored, never DVC outputs: they must survive a crash and DVC's clean-up before a rerun.
    checkpoints = property(lambda self: self.root / "checkpoints")
    counterpart_checkpoints = property(lambda self: self.root / "checkpoints-counterpart")
    # Beside checkpoints/, not in it: that folder is deleted while the lock is held.
    train_lock = property(lambda self: self.root / ".train.lock")
    # The checkout's, not the store's: the store may be a server, and queued experiments share it.
    champion_lock = property(lambda self: self.checkout / ".champion.lock")
    mlruns = property(lambda self: self.checkout / "mlruns")
    sweeps = property(lambda self: self.checkout / "sweeps")
