"""The study's plots for the sweep's parent run: Optuna's optimisation history, parameter
importances and slice plots, and the rate-distortion plane of the complete trials (for a
rate-distortion study, with its Pareto front and lines of equal -ELBO). study_summary.py imports
this module only when there is something to draw, so a sweep that draws nothing needs no
matplotlib."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import optuna

from .files import atomic_path

DPI = 120  # the stage figures' resolution
NEG_ELBO = "val_neg_elbo (nats per image)"
RATE = "rate: KL (nats per image)"
DISTORTION = "distortion: reconstruction (nats per image)"
ELBO_LINES = 4  # dashed -ELBO = c lines across the points: enough to read the slope, few to clutter


def _save(fig: matplotlib.figure.Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)  # Optuna's figures are pyplot's
    return path


def neg_elbo(trial: optuna.trial.FrozenTrial) -> float:
    """A rate-distortion trial's -ELBO: its two values, rate + distortion."""
    return sum(trial.values)


def study_plots(study: optuna.Study, out_dir: Path) -> list[Path]:
    """Optuna's optimisation history, parameter importances and slice plots, plus the
    rate-distortion scatter of the complete trials (val_recon vs val_kl, coloured by kl_weight).
    For a rate-distortion study the history and slices are of -ELBO (Optuna's plots take one
    target), the importances are per objective, and the scatter is its Pareto-front figure."""
    import optuna.visualization.matplotlib as ovm

    multi = len(study.directions) > 1
    paths = []
    for name, plot in (("optimization_history", ovm.plot_optimization_history),
                       ("param_importances", ovm.plot_param_importances),
                       ("slice", ovm.plot_slice)):
        # Importances of a multi-objective study come per objective, named by its metric names.
        target = {"target": neg_elbo} if multi and plot is not ovm.plot_param_importances else {}
        try:
            with warnings.catch_warnings():
                # PED-ANOVA's note that it ranks params for low values: both objectives are minimised.
                warnings.filterwarnings("ignore", "PedAnovaImportanceEvaluator computes")
                # Too few trials: Optuna would draw equal importances, which say nothing.
                warnings.filterwarnings("error", "The number of trials is too small")
                axes = plot(study, target_name=NEG_ELBO, **target)
        except (ValueError, RuntimeError, UserWarning):  # e.g. importances need two complete, differing trials
            continue
        fig = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        paths.append(_save(fig, out_dir / f"{name}.png"))
    if multi:
        paths.append(_save(pareto_front_figure(study), out_dir / "pareto_front.png"))
        return paths
    trials = [t for t in study.trials if "val_kl" in t.user_attrs]
    fig, ax = plt.subplots(figsize=(6, 5))
    points = ax.scatter([t.user_attrs["val_kl"] for t in trials],
                        [t.user_attrs["val_recon"] for t in trials],
                        c=[t.params["kl_weight"] for t in trials], cmap="viridis",
                        norm=matplotlib.colors.LogNorm())
    fig.colorbar(points, ax=ax, label="kl_weight")
    ax.set(title="Rate-distortion of the complete trials (validation)", xlabel=RATE, ylabel=DISTORTION)
    paths.append(_save(fig, out_dir / "rate_distortion.png"))
    return paths


def pareto_front_figure(study: optuna.Study) -> matplotlib.figure.Figure:
    """A rate-distortion study's trials in the (rate, distortion) = (val_kl, val_recon) plane:
    every complete trial coloured by kl_weight, the Pareto front as the staircase that bounds
    what the trials reached, and dashed lines of equal -ELBO (rate + distortion = c), along which
    the beta-free objective cannot tell two trials apart."""
    complete = study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])
    front = sorted(study.best_trials, key=lambda t: t.values[0])  # by rate
    fig, ax = plt.subplots(figsize=(6.5, 5))
    rate, distortion = np.array([t.values for t in complete]).T
    points = ax.scatter(rate, distortion, c=[t.params["kl_weight"] for t in complete], cmap="viridis",
                        norm=matplotlib.colors.LogNorm(), zorder=3)
    fig.colorbar(points, ax=ax, label="kl_weight")
    # Minimising both: from each front trial the bound runs right at its distortion, then drops
    # to the next trial's.
    ax.step([t.values[0] for t in front], [t.values[1] for t in front], where="post", color="tab:red",
            marker="o", markerfacecolor="none", markersize=11, zorder=2,
            label=f"Pareto front ({len(front)} of {len(complete)} trials)")
    ax.margins(0.1)
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    sums = rate + distortion
    for i, c in enumerate(np.linspace(sums.min(), sums.max(), ELBO_LINES) if len(sums) > 1 else sums):
        # The part of recon + kl = c inside the axes, labelled at its upper end.
        lo, hi = max(x0, c - y1), min(x1, c - y0)
        if lo < hi:
            ax.plot([lo, hi], [c - lo, c - hi], "--", color="gray", linewidth=0.8, zorder=1,
                    label="-ELBO = rate + distortion = c" if i == 0 else None)
            ax.annotate(f" {c:.1f}", (lo, c - lo), ha="left", va="top", fontsize=7, color="gray")
    ax.set(xlim=(x0, x1), ylim=(y0, y1), xlabel=RATE, ylabel=DISTORTION,
           title="Rate-distortion trials and their Pareto front (validation)")
    ax.legend(loc="upper right", fontsize=8)
    return fig
