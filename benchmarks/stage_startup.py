"""Start-up of each DVC stage: process start to the first line of its `main()`, measured from outside.

What: for each of the six stage scripts in pipeline/, a fresh `python` process loads the script as
DVC's `python pipeline/<stage>.py` does (its imports, `command()`'s process set-up) but, instead of
calling `main()`, prints one line; the time from starting the process to reading that line is the
stage's start-up, everything a stage pays before its first line of work. Also the peak RSS at that
point (the imports' share of a stage's memory) and which heavy libraries were imported.

Goals: download < 1 s; evaluate, classifier, figures < 3 s (docs/benchmarks.md). Start-ups on a shared
machine vary with the page cache and other processes, so each is the median of --repeats runs
after one warm-up run that fills the page cache (as the second stage of a `dvc repro` finds it).

The last stdout line is `startup_s=download:0.31,train:5.2,...` (medians, seconds).

    python benchmarks/stage_startup.py [--repeats 3] [--stages download evaluate]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("download", "train", "classifier", "evaluate", "counterpart", "figures")
HEAVY = ("torch", "lightning", "mlflow", "matplotlib", "torchvision", "optuna")

# Runs in the child: the stage script's module body (not its main(), which the __main__ guard
# keeps from running), then command()'s set-up, then one JSON line (mnist_vae.cli in code before
# process.py, for --root trees of older commits).
PROBE = """
import json, resource, runpy, sys
try:
    from mnist_vae.process import set_up_process
except ImportError:
    from mnist_vae.cli import set_up_process
runpy.run_path(sys.argv[1], run_name="startup_probe")
set_up_process()
print(json.dumps({"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "heavy": [m for m in sys.argv[2].split(",") if m in sys.modules]}), flush=True)
"""


def start_up(stage: str, root: Path) -> tuple[float, dict]:
    """Seconds from process start to the line the probe prints, and that line."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", PROBE, str(root / "pipeline" / f"{stage}.py"),
                             ",".join(HEAVY)], cwd=root, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - started
    proc.communicate()
    if proc.returncode != 0 or not line:
        raise SystemExit(f"{stage}: the probe failed (exit {proc.returncode})")
    return elapsed, json.loads(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per stage (default 3)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--root", type=Path, default=ROOT, help="the project (default: this one)")
    args = parser.parse_args()
    # This project's code, not whichever copy the environment's editable install points at.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(args.root / "src"), os.environ.get("PYTHONPATH", "")])
    print(f"{'stage':<13}{'median s':>9}{'min s':>7}{'max s':>7}{'RSS MiB':>9}  heavy imports")
    medians = {}
    for stage in args.stages:
        start_up(stage, args.root)  # warm-up: the page cache, as a stage after the first finds it
        runs = [start_up(stage, args.root) for _ in range(args.repeats)]
        seconds = [s for s, _ in runs]
        medians[stage] = statistics.median(seconds)
        info = runs[-1][1]
        print(f"{stage:<13}{medians[stage]:>9.2f}{min(seconds):>7.2f}{max(seconds):>7.2f}"
              f"{info['rss_mib']:>9.0f}  {', '.join(info['heavy']) or '-'}", flush=True)
    print("startup_s=" + ",".join(f"{stage}:{s:.2f}" for stage, s in medians.items()))


if __name__ == "__main__":
    main()
