"""Test metrics of a trained VAE, all in nats per image: -ELBO, its two terms, and the IWAE bound."""

from __future__ import annotations

import torch
from torch import Tensor

from .data import to_float
from .model import VAE, bernoulli_nll, iwae_nll, kl_divergence, neg_elbo_terms


@torch.inference_mode()
def evaluate(vae: VAE, images: Tensor, iwae_samples: int, batch_size: int = 500,
             seed: int = 0) -> dict[str, float]:
    """Metrics over (N, 784) uint8 images. Seeded, so the same model gives the same numbers.
    For the AE only test_recon: it has no ELBO, no IWAE bound and no posterior to collapse."""
    recon_sum = kl_sum = iwae_sum = 0.0  # Python floats: float64 totals over the test set
    means = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for chunk in images.split(batch_size):
            x = to_float(chunk)
            logits, mu, logvar = vae(x)
            if not vae.variational:
                recon_sum += bernoulli_nll(logits, x).sum().item()
                continue
            recon, kl = neg_elbo_terms(logits, x, mu, logvar)
            recon_sum, kl_sum = recon_sum + recon.sum().item(), kl_sum + kl.sum().item()
            iwae_sum += iwae_nll(vae, x, iwae_samples).sum().item()
            means.append(mu)
    n = len(images)
    if not vae.variational:
        return {"test_recon": recon_sum / n, "n_test": n}
    return {"test_neg_elbo": (recon_sum + kl_sum) / n, "test_recon": recon_sum / n,
            "test_kl": kl_sum / n, "test_iwae_nll": iwae_sum / n, "n_test": n,
            "iwae_samples": iwae_samples, "active_units": active_units(torch.cat(means))}


@torch.inference_mode()
def per_image_nats(vae: VAE, images: Tensor, iwae_samples: int, batch_size: int = 500,
                   seed: int = 0) -> Tensor:
    """(N,) float64: what the registry ranks models by, per (N, 784) uint8 image, in nats: the
    IWAE bound on -log p(x), its noise from a generator of its own seeded `seed` (so any two
    models are scored alike, whatever else draws noise), or the AE's reconstruction."""
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for chunk in images.split(batch_size):
        x = to_float(chunk)
        if vae.variational:
            parts.append(iwae_nll(vae, x, iwae_samples, generator=generator))
        else:
            parts.append(bernoulli_nll(vae(x)[0], x))  # the AE's code is its mean: no noise
    return torch.cat(parts).double()


ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016, section 5.2


def active_dims(mu: Tensor) -> Tensor:
    """(latent_dim,) bool: the dimensions whose posterior mean varies with x, Cov_x(E_q[z_d]) >
    0.01, given the means mu (N, latent_dim). The others carry no information about the image."""
    return mu.var(0) > ACTIVE_UNIT_THRESHOLD


def active_units(mu: Tensor) -> int:
    return int(active_dims(mu).sum())


@torch.inference_mode()
def encode(vae: VAE, images: Tensor, batch_size: int = 2048) -> tuple[Tensor, Tensor | None]:
    """mu and logvar (None for the AE) of (N, 784) uint8 images, a batch at a time: at once, the
    float copy of 60,000 images and its activations would take ~300 MB."""
    parts = [vae.encode(to_float(chunk)) for chunk in images.split(batch_size)]
    mu = torch.cat([m for m, _ in parts])
    return mu, torch.cat([v for _, v in parts]) if vae.variational else None


@torch.inference_mode()
def kl_per_dimension(vae: VAE, images: Tensor) -> Tensor:
    """(latent_dim,) mean KL(q(z_d|x) || N(0, 1)) over the images, in nats: which dims are used."""
    mu, logvar = encode(vae, images)
    return kl_divergence(mu, logvar).mean(0)


def collapse_warning(metrics: dict[str, float]) -> str | None:
    """A warning when the posterior has collapsed onto the prior: z then tells nothing of x."""
    if "active_units" not in metrics:  # the AE
        return None
    if metrics["active_units"] == 0 or metrics["test_kl"] < 0.1:
        return (f"posterior collapse: {metrics['active_units']} active units, KL "
                f"{metrics['test_kl']:.3f} nats; the decoder ignores z (try a lower model.kl_weight)")
    return None


def format_metrics(metrics: dict[str, float]) -> str:
    """Aligned `name  value` lines, for people (metrics/evaluate.json is for programs)."""
    width = max(map(len, metrics))
    return "\n".join(f"{name:<{width}}  {_shown(value)}" for name, value in metrics.items())


def _shown(value: float) -> str:
    # nats to two decimals (runs differ by tenths), fractions and accuracies to four
    if isinstance(value, int):
        return str(value)
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"
