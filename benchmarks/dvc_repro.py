"""`dvc repro -f` at the defaults: total time, each stage's, and the share that is start-up.

What: the project (pipeline/, src/, dvc.yaml, params.yaml) is copied into a temp git repo and
`dvc repro -f` runs there, as a user runs it. Each stage's time runs from DVC's "Running stage"
line to the next one (so it includes DVC's own hashing and caching of its outputs). Then, in the
same copy, each stage's start-up (process start to the first line of its main(), the probe of
benchmarks/stage_startup.py, median of 3 after a warm-up) and, run again outside DVC, the peak
RSS of evaluate and figures (goal: under 700 MB each).

`--against DIR` compares with other code side by side instead: `git worktree add
/tmp/old <commit>`, then `--against /tmp/old` alternates `dvc repro -f` of a copy of each (the
reference first, --rounds times). This machine's speed drifts by 20% within minutes, so each
round's ratio compares two runs a minute apart, and the figure is the median of those; the ratio
of CPU seconds (DVC and its stages), less sensitive to the machine's load, comes beside it.

The last stdout line is `repro_s=X startup_s=Y startup_share=Z`, or with --against
`speedup=R cpu_speedup=C` (medians over rounds of the reference's seconds / this project's).

    python benchmarks/dvc_repro.py [--project DIR] [--set train.max_epochs=2 ...] [--targets STAGE ...]
    python benchmarks/dvc_repro.py --against /tmp/old [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from stage_startup import start_up

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment's python and dvc


def copy_project(project: Path, to: Path, overrides: dict[str, object]) -> None:
    """A fresh git repo holding the pipeline, params.yaml with `overrides` (section.key: value)."""
    to.mkdir()
    for name in ("pipeline", "src", ".dvc"):
        shutil.copytree(project / name, to / name, ignore=shutil.ignore_patterns(
            "__pycache__", "*.egg-info", "tmp", "cache"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        if (project / name).exists():
            shutil.copy(project / name, to / name)
    params = yaml.safe_load((project / "params.yaml").read_text())
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        params[section][name] = value
    (to / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=to, check=True)


def timed_repro(repo: Path, env: dict[str, str], targets: list[str]) -> tuple[float, dict[str, float], float]:
    """Total seconds of `dvc repro -f`, each stage's (from its streamed output), and the CPU
    seconds of DVC and every stage it ran (their rusage)."""
    started = time.perf_counter()
    marks: list[tuple[str, float]] = []
    proc = subprocess.Popen(["dvc", "repro", "-f", *targets], cwd=repo, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = []
    for line in proc.stdout:
        output.append(line)
        if match := re.match(r"Running stage '([^']+)'", line):
            marks.append((match[1], time.perf_counter()))
    _, status, usage = os.wait4(proc.pid, 0)  # includes the stages: DVC waits for each
    total = time.perf_counter() - started
    if (returncode := os.waitstatus_to_exitcode(status)) != 0:
        raise SystemExit(f"dvc repro -f exited {returncode}:\n{''.join(output[-30:])}")
    ends = [t for _, t in marks[1:]] + [started + total]
    stages = {stage: end - begin for (stage, begin), end in zip(marks, ends, strict=True)}
    return total, stages, usage.ru_utime + usage.ru_stime


def repro_env(repo: Path) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(repo / "src")}  # the copy's code, not the editable install's
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def side_by_side(reference: Path, project: Path, rounds: int, overrides: dict[str, object],
                 targets: list[str]) -> None:
    """`dvc repro -f` of a fresh copy of each, alternating, so both see the same machine."""
    ratios, cpu_ratios = [], []
    for round_ in range(rounds):
        seconds, cpu = {}, {}
        for name, code in (("reference", reference), ("this", project)):
            with tempfile.TemporaryDirectory() as tmp:
                repo = Path(tmp) / "project"
                copy_project(code.resolve(), repo, overrides)
                seconds[name], stages, cpu[name] = timed_repro(repo, repro_env(repo), targets)
            print(f"round {round_ + 1} {name:<9} {code}: {seconds[name]:.1f} s, CPU {cpu[name]:.1f} s ("
                  + ", ".join(f"{stage} {s:.1f}" for stage, s in stages.items()) + ")", flush=True)
        ratios.append(seconds["reference"] / seconds["this"])
        cpu_ratios.append(cpu["reference"] / cpu["this"])
    print("ratio per round: " + ", ".join(f"{r:.2f}" for r in ratios)
          + "; CPU: " + ", ".join(f"{r:.2f}" for r in cpu_ratios))
    print(f"speedup={statistics.median(ratios):.2f} cpu_speedup={statistics.median(cpu_ratios):.2f}")


def peak_rss_mib(cmd: list[str], repo: Path, env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one command, from its own rusage (os.wait4)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, default=ROOT, help="the project to copy (default: this one)")
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                        help="params.yaml overrides in the copy, YAML values (default: none, the defaults)")
    parser.add_argument("--targets", nargs="*", default=[], metavar="STAGE",
                        help="reproduce only these stages and what they depend on (default: all)")
    parser.add_argument("--against", type=Path, metavar="DIR",
                        help="other code (a git worktree) to time side by side, alternating")
    parser.add_argument("--rounds", type=int, default=2, help="with --against: runs of each (default 2)")
    args = parser.parse_args()
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    if args.against:
        return side_by_side(args.against, args.project, args.rounds, overrides, args.targets)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "project"
        copy_project(args.project.resolve(), repo, overrides)
        env = repro_env(repo)
        total, stages, _ = timed_repro(repo, env, args.targets)
        os.environ["PYTHONPATH"] = env["PYTHONPATH"]
        startups = {}
        for stage in stages:
            start_up(stage, repo)  # warm-up: the page cache, as a stage after the first finds it
            startups[stage] = sorted(start_up(stage, repo)[0] for _ in range(3))[1]
        rss = {stage: peak_rss_mib([sys.executable, f"pipeline/{stage}.py"], repo, env)
               for stage in ("evaluate", "figures") if stage in stages}
    print(f"dvc repro -f in a copy of {args.project}" + (f" with {' '.join(args.set)}" if args.set else ""))
    print(f"{'stage':<13}{'repro s':>9}{'start-up s':>12}{'peak RSS MiB':>14}")
    for stage in stages:
        memory = f"{rss[stage][1]:>14.0f}" if stage in rss else f"{'':>14}"
        print(f"{stage:<13}{stages[stage]:>9.1f}{startups[stage]:>12.2f}{memory}")
    startup = sum(startups.values())
    print(f"{'total':<13}{total:>9.1f}{startup:>12.1f}  (DVC's own start-up and checks: "
          f"{total - sum(stages.values()):.1f} s before the first stage)")
    print(f"repro_s={total:.1f} startup_s={startup:.1f} startup_share={startup / total:.2f}")


if __name__ == "__main__":
    main()
