"""The study's plots for the sweep's parent run: Optuna's optimisation history, parameter
importances and slice plots, and the rate-distortion plane of the complete trials.
study_summary.py imports this module only when there is something to draw, so a sweep that draws
nothing needs no matplotlib."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import optuna

from .files import atomic_path

DPI = 120  # the stage figures' resolution


def _save(fig: matplotlib.figure.Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)  # Optuna's figures are pyplot's
    return path


def study_plots(study: optuna.Study, out_dir: Path) -> list[Path]:
    """Optuna's optimisation history, parameter importances and slice plots, plus the
    rate-distortion scatter of the complete trials (val_recon vs val_kl, coloured by kl_weight)."""
    import optuna.visualization.matplotlib as ovm

    paths = []
    for name, plot in (("optimization_history", ovm.plot_optimization_history),
                       ("param_importances", ovm.plot_param_importances),
                       ("slice", ovm.plot_slice)):
        try:
            axes = plot(study, target_name="val_neg_elbo (nats per image)")
        except (ValueError, RuntimeError):  # e.g. importances need two complete, differing trials
            continue
        fig = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        paths.append(_save(fig, out_dir / f"{name}.png"))
    trials = [t for t in study.trials if "val_kl" in t.user_attrs]
    fig, ax = plt.subplots(figsize=(6, 5))
    points = ax.scatter([t.user_attrs["val_kl"] for t in trials],
                        [t.user_attrs["val_recon"] for t in trials],
                        c=[t.params["kl_weight"] for t in trials], cmap="viridis",
                        norm=matplotlib.colors.LogNorm())
    fig.colorbar(points, ax=ax, label="kl_weight")
    ax.set(title="Rate-distortion of the complete trials (validation)",
           xlabel="rate: KL (nats per image)", ylabel="distortion: reconstruction (nats per image)")
    paths.append(_save(fig, out_dir / "rate_distortion.png"))
    return paths
