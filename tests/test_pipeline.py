"""End to end, in a temp git repo: the real `dvc repro`, `dvc exp run` and CLI, with tiny params."""

import json
import shlex
import sys
import time

import mlflow
import pytest
import yaml

from .conftest import ROOT, artifact_paths, metric_steps, mlflow_runs, pipeline_runs, run

pytestmark = pytest.mark.slow  # end to end: the fast tier (pytest -m "not slow" -n 0) skips it

METRIC_KEYS = {"test_neg_elbo", "test_recon", "test_kl", "test_iwae_nll", "n_test", "active_units"}
QUALITY_KEYS = {"sample_fd", "sample_confidence", "recon_accuracy", "latent_probe_accuracy"}
FIGURES = {"latent_space.png", "reconstructions.png", "prior_samples.png", "interpolation.png",
           "latent_grid.png", "kl_per_dimension.png", "training_curves.png", "vae_vs_ae.png"}



def test_repro_then_noop_then_experiment(project):
    run(["dvc", "repro"], project)

    metrics = json.loads((project / "metrics" / "evaluate.json").read_text())
    assert METRIC_KEYS | QUALITY_KEYS <= set(metrics) and metrics["n_test"] == 500
    assert metrics["test_iwae_nll"] < metrics["test_neg_elbo"]
    assert {p.name for p in (project / "figures").iterdir()} == FIGURES
    shown = run(["dvc", "metrics", "show", "--json"], project).stdout
    assert "test_iwae_nll" in shown

    (first,) = pipeline_runs(project)
    assert first.info.status == "FINISHED"
    (counterpart,) = [r for r in mlflow_runs(project) if r.info.run_id != first.info.run_id]
    assert counterpart.data.tags["mlflow.parentRunId"] == first.info.run_id
    assert counterpart.data.params["model.kind"] == "ae" and counterpart.info.status == "FINISHED"
    assert first.data.params["model.latent_dim"] == "2"
    assert {"test_iwae_nll", "val_neg_elbo", "train_loss"} <= set(first.data.metrics)
    # one value per epoch, step = epoch
    assert metric_steps(project, first.info.run_id, "val_neg_elbo") == [0, 1]
    artifacts = artifact_paths(project, first.info.run_id, "figures")
    assert artifacts == {f"figures/{name}" for name in FIGURES}
    assert (project / "mlruns" / "artifacts").is_dir()

    # Importing the package writes __pycache__ into src/; .dvcignore keeps it out of the hashes.
    run([sys.executable, "-c", "import compileall; compileall.compile_dir('src', quiet=1)"], project)
    again = run(["dvc", "repro"], project)
    assert "Running stage" not in again.stdout, again.stdout
    assert len(pipeline_runs(project)) == 1

    # The variant is an IWAE: trained on the 3-sample bound, evaluated, registered and drawn as a VAE.
    run(["dvc", "exp", "run", "-S", "model.kind=iwae", "-S", "model.iwae_k=3", "-S", "data.binarize=dynamic"],
        project)
    runs = pipeline_runs(project)
    assert len(runs) == 2
    variant = next(r for r in runs if r.info.run_id != first.info.run_id)
    assert variant.data.params["model.kind"] == "iwae" and variant.data.params["model.iwae_k"] == "3"
    assert variant.info.status == "FINISHED"
    assert variant.data.tags["data.binarize"] == "dynamic"
    assert variant.data.tags.get("dvc.exp_name")
    assert {"val_iwae_k", "val_neg_elbo", "test_iwae_nll", "sample_fd"} <= set(variant.data.metrics)
    assert metric_steps(project, variant.info.run_id, "val_iwae_k") == [0, 1]
    assert artifact_paths(project, variant.info.run_id, "figures") == {f"figures/{name}" for name in FIGURES}
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    (version,) = client.search_model_versions(f"name = 'mnist-vae' and run_id = '{variant.info.run_id}'")
    assert version.tags["model.kind"] == "iwae"
    # Binarized test images do not compare with grayscale ones: the champion stays the first.
    assert str(client.get_model_version_by_alias("mnist-vae", "champion").version) == "1"
    assert "test_iwae_nll" in run(["dvc", "exp", "show", "--json"], project).stdout
    # The README's comparison fits a terminal: drawn 400 columns wide, no line passes 120.
    table = run([*readme_command("dvc exp show --only-changed"), "--no-pager"], project,
                env_extra={"COLUMNS": "400"}).stdout
    assert max(len(line) for line in table.splitlines()) <= 120, table
    assert all(column in table for column in ("test_iwae_nll", "model.kind", "data.binarize")), table

    # The evaluate CLI scores any checkpoint on any IDX image file; JSON on the last line.
    out = run([sys.executable, "-m", "mnist_vae", "evaluate", "--checkpoint", "models/best.ckpt",
               "--images", "data/t10k-images-idx3-ubyte.gz", "--iwae-samples", "3"], project)
    scored = json.loads(out.stdout.strip().splitlines()[-1])
    assert METRIC_KEYS <= set(scored) and scored["n_test"] == 500


def readme_command(start: str) -> list[str]:
    """The README's command that begins with `start`, from its table (pipes escaped there)."""
    line = next(line for line in (ROOT / "README.md").read_text().splitlines() if f"`{start}" in line)
    rest = line.split(f"`{start}", 1)[1].split("`", 1)[0]
    return shlex.split(start + rest.replace("\\|", "|"))


def test_queued_experiments_in_parallel_land_in_the_projects_store_grouped_by_config(project):
    """Queued experiments run in copies under .dvc/tmp/exps, two at once on one SQLite store: a
    seed range in the README's form (DVC expands it with hydra) and the AE."""
    run(["dvc", "repro", "download"], project)
    for setting in ("train.seed=range(0,2)", "model.kind=ae"):
        run(["dvc", "exp", "run", "--queue", "-S", setting], project)
    run(["dvc", "queue", "start", "-j", "2"], project, env_extra={"OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while (status := run(["dvc", "queue", "status"], project).stdout).count("Success") < 3:
        assert "Failed" not in status and time.monotonic() < deadline, status
        time.sleep(2)
    runs = pipeline_runs(project)
    assert all(r.info.status == "FINISHED" and r.data.tags.get("dvc.exp_name") for r in runs)
    seeds = [r for r in runs if r.data.params["model.kind"] == "vae"]
    assert sorted(r.data.params["train.seed"] for r in seeds) == ["0", "1"]
    (group,) = {r.data.tags["config.group"] for r in seeds}  # one group: they differ only in seed
    (ae,) = [r for r in runs if r.data.params["model.kind"] == "ae"]
    assert ae.data.tags["config.group"] != group
    # The AE through the whole pipeline: metrics that make sense for it, none faked.
    assert QUALITY_KEYS | {"test_recon"} <= set(ae.data.metrics)
    assert not {"test_neg_elbo", "test_iwae_nll", "val_neg_elbo"} & set(ae.data.metrics)
    assert not list((project / ".dvc" / "tmp").glob("exps/*/mlruns"))


def test_bad_param_fails_fast_with_one_line_and_no_run(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"]["latnt_dim"] = 4
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    result = run([sys.executable, "pipeline/train.py"], project, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: params.yaml: unknown key model.latnt_dim; did you mean "
                                     "model.latent_dim? (fix it in params.yaml or with dvc exp run -S)")
    assert not (project / "mlruns").exists()
