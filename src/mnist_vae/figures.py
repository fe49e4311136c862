"""The original tutorial's five figures plus training curves, drawn as labelled PNGs."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch
from torch import Tensor

from .config import FiguresConfig
from .data import to_float
from .evaluate import active_dims, encode, kl_per_dimension
from .files import atomic_path
from .model import VAE

DPI = 120
TILE_INCHES = 0.6  # one 28x28 digit drawn 72 px wide: big enough to see strokes
CLASS_NAMES = {
    "mnist": [str(d) for d in range(10)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"],
}


def _save(fig: plt.Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _image_grid(images: Tensor, rows: int, cols: int, title: str, row_labels=()) -> plt.Figure:
    """images: (rows * cols, 784) in [0, 1], drawn as one mosaic (one imshow, not rows * cols axes)."""
    pad = 2
    tiles = torch.nn.functional.pad(images.reshape(rows, cols, 28, 28), (pad, pad, pad, pad), value=1.0)
    mosaic = tiles.permute(0, 2, 1, 3).reshape(rows * (28 + 2 * pad), cols * (28 + 2 * pad))
    fig, ax = plt.subplots(figsize=(1 + cols * TILE_INCHES, 0.8 + rows * TILE_INCHES))
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([(28 + 2 * pad) * (i + 0.5) for i in range(len(row_labels))], row_labels)
    ax.set_title(title)
    return fig


def latent_space(mu: Tensor, labels: Tensor, class_names: list[str], path: Path) -> Path:
    """Test latent means coloured by class; a PCA projection when latent_dim > 2."""
    title = "Latent space: posterior means of test images"
    axes = ("z[0]", "z[1]")
    if mu.shape[1] > 2:
        centred = mu - mu.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        mu = centred @ v[:2].T
        title += f"\n(PCA projection of the {centred.shape[1]}-D latent space)"
        axes = ("principal component 1", "principal component 2")
    elif mu.shape[1] == 1:
        mu = torch.cat([mu, torch.zeros_like(mu)], 1)
        axes = ("z[0]", "(1-D latent space)")
    fig, ax = plt.subplots(figsize=(7, 6))
    scatter = ax.scatter(mu[:, 0], mu[:, 1], c=labels, cmap="tab10", s=4, vmin=-0.5, vmax=9.5)
    bar = fig.colorbar(scatter, ax=ax, ticks=range(10), label="class of the test image")
    bar.ax.set_yticklabels(class_names)
    ax.set(title=title, xlabel=axes[0], ylabel=axes[1])
    return _save(fig, path)


def reconstructions(x: Tensor, reconstructed: Tensor, path: Path) -> Path:
    fig = _image_grid(torch.cat([x, reconstructed]), 2, len(x),
                      "Reconstructions (decoder mean of z = mu)", row_labels=["original", "recon."])
    return _save(fig, path)


def prior_samples(images: Tensor, path: Path) -> Path:
    cols = int(len(images) ** 0.5)
    rows = len(images) // cols
    fig = _image_grid(images[:rows * cols], rows, cols, "Samples: decoder mean of z ~ N(0, I)")
    return _save(fig, path)


def interpolation(images: Tensor, path: Path) -> Path:
    fig = _image_grid(images, 1, len(images),
                      "Interpolation between two test digits' latent means")
    return _save(fig, path)


def latent_grid(images: Tensor, grid_size: int, latent_dim: int, path: Path) -> Path:
    title = "Decoder over a grid of the prior's quantiles (5%..95%)"
    if latent_dim > 2:
        title += f"\n(z[0], z[1] vary; the other {latent_dim - 2} dims are 0)"
    fig = _image_grid(images, grid_size, grid_size, title)
    fig.axes[0].set(xlabel="z[0]: quantiles 5% -> 95%", ylabel="z[1]: quantiles 95% -> 5%")
    return _save(fig, path)


def vae_vs_ae(models: dict[str, VAE], ends: Tensor, z_prior: Tensor, path: Path) -> Path:
    """The tutorial's argument in one picture: the same prior samples z ~ N(0, I) and the same two
    test digits' interpolation through each model. ends: (2, 784) images; z_prior: (n, latent)."""
    steps = torch.linspace(0, 1, len(z_prior))[:, None]
    rows, labels = [], []
    for name, model in models.items():
        rows.append(torch.sigmoid(model.decode(z_prior)))
        labels.append(f"{name} samples")
    for name, model in models.items():
        start, end = model.encode(ends)[0]
        rows.append(torch.sigmoid(model.decode(start * (1 - steps) + end * steps)))
        labels.append(f"{name} interpolation")
    fig = _image_grid(torch.cat(rows), len(rows), len(z_prior),
                      "VAE vs plain autoencoder: prior samples and interpolations", labels)
    return _save(fig, path)


def kl_per_dimension_plot(kl: Tensor, active: Tensor, path: Path) -> Path:
    """kl: (latent_dim,) nats; active: (latent_dim,) bool, the active units."""
    fig, ax = plt.subplots(figsize=(max(5, 0.4 * len(kl) + 2), 4))
    ax.bar(range(len(kl)), kl, color=["tab:blue" if a else "tab:gray" for a in active])
    ax.set(title=f"KL per latent dimension on test images ({int(active.sum())} of {len(kl)} active)",
           xlabel="latent dimension", ylabel="KL(q(z_d|x) || N(0, 1)), nats",
           xticks=range(len(kl)))
    return _save(fig, path)


def training_curves(history: list[dict[str, float]], path: Path) -> Path:
    epochs = [int(row["epoch"]) for row in history]  # 0-based, as in the CSV and MLflow's steps
    fig, (loss_ax, kl_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    columns = {key: [row[key] for row in history] for key in history[0]}
    loss_ax.plot(epochs, columns["train_loss"], label="train_loss (weighted objective)")
    if columns["val_loss"] == columns.get("val_neg_elbo"):  # kl_weight 1: the same curve
        loss_ax.plot(epochs, columns["val_loss"], label="val_loss = val_neg_elbo (kl_weight 1)")
    else:
        loss_ax.plot(epochs, columns["val_loss"], label="val_loss (weighted objective)")
        if "val_neg_elbo" in columns:  # the AE has no ELBO
            loss_ax.plot(epochs, columns["val_neg_elbo"], "--", label="val_neg_elbo (kl_weight 1)")
    loss_ax.set(title="Loss per image", xlabel="epoch", ylabel="nats per image")
    loss_ax.legend()
    for key in ("val_recon", "val_kl"):
        if key in columns:
            kl_ax.plot(epochs, columns[key], label=key)
    kl_ax.set(title="-ELBO terms on validation", xlabel="epoch", ylabel="nats per image (log scale)",
              yscale="log")
    kl_ax.legend()
    return _save(fig, path)


@torch.inference_mode()
def draw_all(vae: VAE, images: Tensor, labels: Tensor, history: list[dict[str, float]],
             dataset: str, cfg: FiguresConfig, out_dir: Path,
             counterpart: VAE | None = None) -> list[Path]:
    """All figures from test images ((N, 784) uint8) and the training history; with the same
    MLPs trained as the other kind (AE for a VAE, VAE for an AE), the two side by side."""
    gen = torch.Generator().manual_seed(cfg.seed)
    mu, _ = encode(vae, images)
    pick = torch.randperm(len(images), generator=gen)
    shown = to_float(images[pick[:cfg.n_reconstructions]])
    ends = mu[pick[-2:]]
    steps = torch.linspace(0, 1, cfg.interpolation_steps)[:, None]
    z_interpolated = ends[0] * (1 - steps) + ends[1] * steps
    z_prior = torch.randn(cfg.n_samples, vae.latent_dim, generator=gen)
    quantiles = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, cfg.grid_size))
    z_grid = torch.zeros(cfg.grid_size ** 2, vae.latent_dim)
    # Top row is the largest z[1], as in the usual plot of a 2-D latent manifold.
    z_grid[:, 0] = quantiles.repeat(cfg.grid_size)
    if vae.latent_dim > 1:
        z_grid[:, 1] = quantiles.flip(0).repeat_interleave(cfg.grid_size)

    def decode(z: Tensor) -> Tensor:
        return torch.sigmoid(vae.decode(z))

    out_dir = Path(out_dir)
    paths = [
        latent_space(mu, labels, CLASS_NAMES[dataset], out_dir / "latent_space.png"),
        reconstructions(shown, vae.reconstruct(shown), out_dir / "reconstructions.png"),
        prior_samples(decode(z_prior), out_dir / "prior_samples.png"),
        interpolation(decode(z_interpolated), out_dir / "interpolation.png"),
        latent_grid(decode(z_grid), cfg.grid_size, vae.latent_dim, out_dir / "latent_grid.png"),
        training_curves(history, out_dir / "training_curves.png"),
    ]
    if counterpart is not None:
        models = {"VAE": vae, "AE": counterpart} if vae.variational else {"VAE": counterpart, "AE": vae}
        paths.append(vae_vs_ae(models, to_float(images[pick[-2:]]), z_prior[:cfg.interpolation_steps],
                               out_dir / "vae_vs_ae.png"))
    if vae.variational:
        paths.append(kl_per_dimension_plot(kl_per_dimension(vae, images), active_dims(mu),
                                           out_dir / "kl_per_dimension.png"))
    return paths


def study_plots(study, out_dir: Path) -> list[Path]:
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
