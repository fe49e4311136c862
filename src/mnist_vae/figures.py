"""The tutorial's five figures, training curves and the KL per latent dimension, each one a
matplotlib Figure (notebooks/explore.ipynb shows them inline); draw_all writes them as PNGs."""

from __future__ import annotations

from pathlib import Path

import torch

# Bare Figures, not plt.subplots: pyplot would hold each one until closed, and Jupyter's inline
# backend would show it twice (at the cell's end, and as the value the cell returns).
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from torch import Tensor

from .config import FiguresConfig
from .data import to_float
from .evaluate import ACTIVE_UNIT_THRESHOLD, active_dims, encode, kl_per_dimension
from .files import atomic_path
from .model import VAE

DPI = 120
TILE_INCHES = 0.6  # one 28x28 digit drawn 72 px wide: big enough to see strokes
CLASS_NAMES = {"mnist": [str(d) for d in range(10)],
               "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                 "Shirt", "Sneaker", "Bag", "Ankle boot"]}
# Latent dimensions' bars; an inactive one grey and hatched, so it reads as unused in greyscale too.
ACTIVE = {"facecolor": "tab:blue", "edgecolor": "tab:blue", "hatch": None}
INACTIVE = {"facecolor": "lightgray", "edgecolor": "dimgray", "hatch": "//"}


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    return path


def _image_grid(images: Tensor, rows: int, cols: int, title: str, row_labels=()) -> Figure:
    """images: (rows * cols, 784) in [0, 1], drawn as one mosaic (one imshow, not rows * cols axes)."""
    pad = 2
    tiles = torch.nn.functional.pad(images.reshape(rows, cols, 28, 28), (pad, pad, pad, pad), value=1.0)
    mosaic = tiles.permute(0, 2, 1, 3).reshape(rows * (28 + 2 * pad), cols * (28 + 2 * pad))
    fig = Figure(figsize=(1 + cols * TILE_INCHES, 0.8 + rows * TILE_INCHES))
    ax = fig.subplots()
    ax.imshow(mosaic.numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set(xticks=[], title=title)
    ax.set_yticks([(28 + 2 * pad) * (i + 0.5) for i in range(len(row_labels))], row_labels)
    return fig


def _check_dims(dims: tuple[int, int], latent_dim: int) -> None:
    if len(dims) != 2 or dims[0] == dims[1] or not all(0 <= d < latent_dim for d in dims):
        raise ValueError(f"dims {tuple(dims)}: expected two different latent dimensions of 0..{latent_dim - 1}")


def latent_space(mu: Tensor, labels: Tensor, class_names: list[str],
                 dims: tuple[int, int] | None = None) -> Figure:
    """Test latent means mu (N, latent_dim) coloured by class: z[dims[0]] against z[dims[1]], or
    with dims None, z[0] and z[1], a PCA projection when latent_dim > 2."""
    title, axes, latent_dim = "Latent space: posterior means of test images", ("z[0]", "z[1]"), mu.shape[1]
    if latent_dim == 1:
        mu, axes = torch.cat([mu, torch.zeros_like(mu)], 1), ("z[0]", "(1-D latent space)")
    elif dims is not None:
        _check_dims(dims, latent_dim)
        mu, axes = mu[:, list(dims)], (f"z[{dims[0]}]", f"z[{dims[1]}]")
        title += f"\n(2 of the {latent_dim} latent dimensions)" if latent_dim > 2 else ""
    elif latent_dim > 2:
        centred = mu - mu.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        mu = centred @ v[:2].T
        title += f"\n(PCA projection of the {latent_dim}-D latent space)"
        axes = ("principal component 1", "principal component 2")
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    scatter = ax.scatter(mu[:, 0], mu[:, 1], c=labels, cmap="tab10", s=4, vmin=-0.5, vmax=9.5)
    bar = fig.colorbar(scatter, ax=ax, ticks=range(10), label="class of the test image")
    bar.ax.set_yticklabels(class_names)
    ax.set(title=title, xlabel=axes[0], ylabel=axes[1])
    return fig


@torch.inference_mode()
def reconstructions(vae: VAE, x: Tensor) -> Figure:
    """x: (n, 784) test digits in [0, 1], above their reconstructions."""
    return _image_grid(torch.cat([x, vae.reconstruct(x)]), 2, len(x),
                       "Reconstructions (decoder mean of z = mu)", row_labels=["original", "recon."])


@torch.inference_mode()
def prior_samples(vae: VAE, z: Tensor) -> Figure:
    """z: (n, latent_dim) draws of N(0, I), decoded as the largest square-ish grid they fill."""
    cols = int(len(z) ** 0.5)
    rows = len(z) // cols
    return _image_grid(torch.sigmoid(vae.decode(z[:rows * cols])), rows, cols,
                       "Samples: decoder mean of z ~ N(0, I)")


@torch.inference_mode()
def interpolation(vae: VAE, ends: Tensor, steps: int) -> Figure:
    """ends: (2, latent_dim), two test digits' latent means; `steps` decoded points from one to the other."""
    t = torch.linspace(0, 1, steps)[:, None]
    return _image_grid(torch.sigmoid(vae.decode(ends[0] * (1 - t) + ends[1] * t)), 1, steps,
                       "Interpolation between two test digits' latent means")


@torch.inference_mode()
def latent_grid(vae: VAE, grid_size: int, dims: tuple[int, int] = (0, 1)) -> Figure:
    """The decoder over a grid_size x grid_size grid of the prior's quantiles (5%..95%): z[dims[0]]
    across, z[dims[1]] down, every other dimension at the prior's mean, 0."""
    quantiles = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, grid_size))
    z = torch.zeros(grid_size ** 2, vae.latent_dim)
    across, down = dims if vae.latent_dim > 1 else (0, 1)
    if vae.latent_dim > 1:
        _check_dims(dims, vae.latent_dim)
        # Top row is the largest z[down], as in the usual plot of a 2-D latent manifold.
        z[:, down] = quantiles.flip(0).repeat_interleave(grid_size)
    z[:, across] = quantiles.repeat(grid_size)
    title = "Decoder over a grid of the prior's quantiles (5%..95%)"
    if vae.latent_dim > 2:
        title += f"\n(z[{across}], z[{down}] vary; the other {vae.latent_dim - 2} dims are 0)"
    fig = _image_grid(torch.sigmoid(vae.decode(z)), grid_size, grid_size, title)
    fig.axes[0].set(xlabel=f"z[{across}]: quantiles 5% -> 95%",
                    ylabel=f"z[{down}]: quantiles 95% -> 5%" if vae.latent_dim > 1 else "(1-D latent space)")
    return fig


@torch.inference_mode()
def vae_vs_ae(models: dict[str, VAE], ends: Tensor, z_prior: Tensor) -> Figure:
    """The tutorial's argument in one picture: the same prior samples z ~ N(0, I) and the same two
    test digits' interpolation through each model. ends: (2, 784) images; z_prior: (n, latent)."""
    steps = torch.linspace(0, 1, len(z_prior))[:, None]
    rows = [torch.sigmoid(model.decode(z_prior)) for model in models.values()]
    for model in models.values():
        start, end = model.encode(ends)[0]
        rows.append(torch.sigmoid(model.decode(start * (1 - steps) + end * steps)))
    labels = [f"{name} samples" for name in models] + [f"{name} interpolation" for name in models]
    return _image_grid(torch.cat(rows), len(rows), len(z_prior),
                       "VAE vs plain autoencoder: prior samples and interpolations", labels)


def kl_per_dimension_plot(kl: Tensor, mu: Tensor) -> Figure:
    """kl: (latent_dim,) mean KL(q(z_d|x) || N(0, 1)), nats; mu: (N, latent_dim) posterior means of
    the same images. Burda et al. (2016, 5.2) count a unit active by how much E_q[z_d] moves with
    x, not by its KL: the second panel shows that, and both grey out the same inactive units."""
    spread, active = mu.var(0), active_dims(mu)  # spread: the diagonal of Cov_x(E_q[z])
    look = {key: [(ACTIVE if a else INACTIVE)[key] for a in active] for key in ACTIVE}
    fig = Figure(figsize=(2 * max(4.5, 0.35 * len(kl) + 1.5), 4.8))
    kl_ax, spread_ax = fig.subplots(1, 2)
    for ax, values in ((kl_ax, kl.tolist()), (spread_ax, spread.tolist())):
        ax.bar_label(ax.bar(range(len(kl)), values, **look), fmt="%.2g", fontsize=7, padding=1)
        ax.set(xlabel="latent dimension d", xticks=range(len(kl)))
    kl_ax.set(title="KL per dimension, mean over test images", ylabel="KL(q(z_d|x) || N(0, 1)), nats")
    # Log scale: an active unit's mean varies by ~1, a collapsed one's by 1e-4 or less.
    spread_ax.set(yscale="log", title="Cov_x(E_q[z_d]): what the count uses",
                  ylabel="variance over test images of E_q[z_d] (log scale)")
    spread_ax.axhline(ACTIVE_UNIT_THRESHOLD, color="tab:red", linestyle="--")
    # The threshold inside the panel, not on its edge; room above the tallest bar for its label.
    spread_ax.set_ylim(min([ACTIVE_UNIT_THRESHOLD, *(v for v in spread.tolist() if v > 0)]) / 10,
                       max(ACTIVE_UNIT_THRESHOLD, float(spread.max())) * 3)
    kl_ax.margins(y=0.08)
    fig.legend(handles=[Patch(**ACTIVE, label="active"),
                        Patch(**INACTIVE, label=f"inactive: Cov_x(E_q[z_d]) <= {ACTIVE_UNIT_THRESHOLD:g}"),
                        Line2D([], [], color="tab:red", linestyle="--", label=f"threshold {ACTIVE_UNIT_THRESHOLD:g}")],
               loc="lower center", ncol=3, frameon=False)
    fig.suptitle(f"{int(active.sum())} of {len(kl)} latent dimensions active on test images: "
                 f"Cov_x(E_q[z_d]) > {ACTIVE_UNIT_THRESHOLD:g}\n"
                 "(Burda et al. 2016: covariance over x of the posterior mean)")
    fig.tight_layout(rect=(0, 0.06, 1, 1))  # room for the legend below the panels
    return fig


def training_curves(history: list[dict[str, float]]) -> Figure:
    epochs = [int(row["epoch"]) for row in history]  # 0-based, as in the CSV and MLflow's steps
    fig = Figure(figsize=(12, 4.5))
    loss_ax, kl_ax = fig.subplots(1, 2)
    columns = {key: [row[key] for row in history] for key in history[0]}
    loss_ax.plot(epochs, columns["train_loss"], label="train_loss (weighted objective)")
    if columns["val_loss"] == columns.get("val_neg_elbo"):  # kl_weight 1: the same curve
        loss_ax.plot(epochs, columns["val_loss"], label="val_loss = val_neg_elbo (kl_weight 1)")
    else:
        loss_ax.plot(epochs, columns["val_loss"], label="val_loss (weighted objective)")
        if "val_neg_elbo" in columns:  # the AE has no ELBO
            loss_ax.plot(epochs, columns["val_neg_elbo"], "--", label="val_neg_elbo (kl_weight 1)")
    if "val_iwae_k" in columns:  # the IWAE's bound, below its ELBO
        loss_ax.plot(epochs, columns["val_iwae_k"], ":", label="val_iwae_k (the bound it trains on)")
    loss_ax.set(title="Loss per image", xlabel="epoch", ylabel="nats per image")
    loss_ax.legend()
    for key in ("val_recon", "val_kl"):
        if key in columns:
            kl_ax.plot(epochs, columns[key], label=key)
    kl_ax.set(title="-ELBO terms on validation", xlabel="epoch", ylabel="nats per image (log scale)",
              yscale="log")
    kl_ax.legend()
    return fig


@torch.inference_mode()
def draw_all(vae: VAE, images: Tensor, labels: Tensor, history: list[dict[str, float]],
             dataset: str, cfg: FiguresConfig, out_dir: Path,
             counterpart: VAE | None = None) -> list[Path]:
    """All figures from test images ((N, 784) uint8) and the training history, as out_dir/<name>.png;
    with the same MLPs trained as the other kind (AE for a VAE, VAE for an AE), the two side by side."""
    gen = torch.Generator().manual_seed(cfg.seed)
    mu, _ = encode(vae, images)
    pick = torch.randperm(len(images), generator=gen)
    z_prior = torch.randn(cfg.n_samples, vae.latent_dim, generator=gen)
    figures = {
        "latent_space": latent_space(mu, labels, CLASS_NAMES[dataset]),
        "reconstructions": reconstructions(vae, to_float(images[pick[:cfg.n_reconstructions]])),
        "prior_samples": prior_samples(vae, z_prior),
        "interpolation": interpolation(vae, mu[pick[-2:]], cfg.interpolation_steps),
        "latent_grid": latent_grid(vae, cfg.grid_size),
        "training_curves": training_curves(history),
    }
    if counterpart is not None:
        models = {"VAE": vae, "AE": counterpart} if vae.variational else {"VAE": counterpart, "AE": vae}
        figures["vae_vs_ae"] = vae_vs_ae(models, to_float(images[pick[-2:]]), z_prior[:cfg.interpolation_steps])
    if vae.variational:
        figures["kl_per_dimension"] = kl_per_dimension_plot(kl_per_dimension(vae, images), mu)
    return [_save(fig, Path(out_dir) / f"{name}.png") for name, fig in figures.items()]

