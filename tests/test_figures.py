"""The figures as Figures: the KL figure's criterion and its inactive dimensions, the two latent
dimensions a scatter or a grid shows, draw_all's files, and the notebook's defaults. Small
synthetic models, no data."""

import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import yaml
from matplotlib.colors import to_rgba

from mnist_vae import figures
from mnist_vae.config import FiguresConfig
from mnist_vae.evaluate import active_units
from mnist_vae.model import VAE

from .conftest import ROOT

STAGE_FIGURES = ["latent_space.png", "reconstructions.png", "prior_samples.png", "interpolation.png",
                 "latent_grid.png", "training_curves.png", "vae_vs_ae.png", "kl_per_dimension.png"]


def test_the_kl_figure_names_its_criterion_and_greys_out_the_inactive_dimension():
    gen = torch.Generator().manual_seed(0)
    # Dimension 1's posterior mean barely moves with x (variance ~1e-4 < 0.01): inactive, though
    # its KL, 0.02 nats, is not 0. This is the figure the issue saw: a small bar counted active.
    mu = torch.randn(400, 3, generator=gen) * torch.tensor([1.0, 0.01, 0.5])
    kl = torch.tensor([2.0, 0.02, 1.5])
    fig = figures.kl_per_dimension_plot(kl, mu)

    title = fig._suptitle.get_text()
    assert active_units(mu) == 2
    assert "2 of 3 latent dimensions active" in title
    assert "Cov_x(E_q[z_d]) > 0.01" in title and "Burda et al. 2016" in title
    kl_ax, spread_ax = fig.axes
    for ax, values in ((kl_ax, kl), (spread_ax, mu.var(0))):
        bars = ax.patches
        assert [bar.get_height() for bar in bars] == pytest.approx(values.tolist())
        assert [bar.get_hatch() for bar in bars] == [None, "//", None]
        assert [bar.get_facecolor() for bar in bars] == [to_rgba("tab:blue"), to_rgba("lightgray"),
                                                         to_rgba("tab:blue")]
    assert spread_ax.get_yscale() == "log"
    assert [line.get_ydata()[0] for line in spread_ax.lines] == [0.01]  # the threshold, drawn
    lowest, highest = spread_ax.get_ylim()
    assert lowest < mu.var(0).min() and highest > mu.var(0).max()  # every bar and the line inside
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "active", "inactive: Cov_x(E_q[z_d]) <= 0.01", "threshold 0.01"]


def tiny_vae(latent_dim: int, variational: bool = True) -> VAE:
    torch.manual_seed(0)
    return VAE([8], latent_dim, variational).eval()


def test_latent_dims_choose_what_the_scatter_and_the_grid_show():
    mu = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(50) % 10
    names = figures.CLASS_NAMES["mnist"]
    (ax, _colorbar) = figures.latent_space(mu, labels, names).axes
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("principal component 1", "principal component 2")
    (ax, _colorbar) = figures.latent_space(mu, labels, names, dims=(0, 2)).axes
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("z[0]", "z[2]")
    np.testing.assert_allclose(ax.collections[0].get_offsets(), mu[:, [0, 2]].numpy())

    vae = tiny_vae(3)
    assert figures.latent_grid(vae, 3).axes[0].get_xlabel() == "z[0]: quantiles 5% -> 95%"
    fig = figures.latent_grid(vae, 3, dims=(2, 0))
    ax = fig.axes[0]
    assert ax.get_xlabel() == "z[2]: quantiles 5% -> 95%" and ax.get_ylabel() == "z[0]: quantiles 95% -> 5%"
    assert "(z[2], z[0] vary; the other 1 dims are 0)" in ax.get_title()
    # Top left: the 5% quantile across (z[2]) and the 95% quantile down (z[0]), z[1] at 0.
    with torch.inference_mode():
        top_left = torch.sigmoid(vae.decode(torch.tensor([1.6449, 0.0, -1.6449]))).reshape(28, 28)
    np.testing.assert_allclose(ax.images[0].get_array()[2:30, 2:30], top_left.numpy(), atol=1e-4)

    for dims in ((1, 1), (0, 3)):
        with pytest.raises(ValueError, match=r"two different latent dimensions of 0\.\.2"):
            figures.latent_grid(vae, 3, dims=dims)
        with pytest.raises(ValueError, match=r"two different latent dimensions of 0\.\.2"):
            figures.latent_space(mu, labels, names, dims=dims)


def test_draw_all_writes_the_stage_figures_and_leaves_no_figure_open(tmp_path):
    images = torch.randint(0, 256, (40, 784), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    history = [{"epoch": e, "train_loss": 200.0 - e, "val_loss": 201.0 - e, "val_neg_elbo": 201.0 - e,
                "val_recon": 195.0 - e, "val_kl": 6.0} for e in range(2)]
    cfg = FiguresConfig(n_reconstructions=3, n_samples=4, interpolation_steps=3, grid_size=3)
    written = figures.draw_all(tiny_vae(2), images, torch.arange(40) % 10, history, "mnist", cfg,
                               tmp_path, counterpart=tiny_vae(2, variational=False))
    assert written == [tmp_path / name for name in STAGE_FIGURES]
    assert all(path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in written)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(STAGE_FIGURES)  # no temp file left
    assert plt.get_fignums() == []



def test_the_notebook_is_committed_clean_with_the_figures_stages_defaults():
    # notebooks/explore.ipynb promises the stage's digits and samples at its defaults.
    notebook = json.loads((ROOT / "notebooks" / "explore.ipynb").read_text())
    (knobs,) = [cell for cell in notebook["cells"] if cell.get("id") == "knobs"]
    values: dict = {}
    exec("".join(knobs["source"]), {}, values)
    stage = yaml.safe_load((ROOT / "params.yaml").read_text())["figures"]
    assert {key: values[key.upper()] for key in ("seed", "n_samples", "grid_size", "interpolation_steps")} == \
        {key: stage[key] for key in ("seed", "n_samples", "grid_size", "interpolation_steps")}
    assert values["N_DIGITS"] == stage["n_reconstructions"]
    assert values["MODEL"] is values["DIGITS"] is values["ENDS"] is values["LATENT_DIMS"] is None
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert all(cell["outputs"] == [] and cell["execution_count"] is None for cell in code)  # committed clean
