"""Test metrics of a trained VAE, all in nats per image: -ELBO, its two terms, and the IWAE bound."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import Tensor

from .config import PipelineError
from .data import to_float
from .model import VAE, LitVAE, bernoulli_nll, iwae_nll, neg_elbo_terms


def load_vae(checkpoint: Path | str) -> VAE:
    """The VAE of a Lightning checkpoint, loaded with weights_only=True: a checkpoint carrying
    pickled code is refused, never run."""
    try:
        module = LitVAE.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{checkpoint}: no such checkpoint; run `dvc repro train` first") from None
    except pickle.UnpicklingError as err:
        raise PipelineError(f"{checkpoint}: refused, it holds more than tensors and plain values "
                            f"({str(err).splitlines()[0]}); load only checkpoints you trust") from None
    return module.vae.eval()


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


ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016, section 5.2


def active_dims(mu: Tensor) -> Tensor:
    """(latent_dim,) bool: the dimensions whose posterior mean varies with x, Cov_x(E_q[z_d]) >
    0.01, given the means mu (N, latent_dim). The others carry no information about the image."""
    return mu.var(0) > ACTIVE_UNIT_THRESHOLD


def active_units(mu: Tensor) -> int:
    return int(active_dims(mu).sum())


@torch.inference_mode()
def kl_per_dimension(vae: VAE, images: Tensor) -> Tensor:
    """(latent_dim,) mean KL(q(z_d|x) || N(0, 1)) over the images, in nats: which dims are used."""
    mu, logvar = vae.encode(to_float(images))
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).mean(0)


def collapse_warning(metrics: dict[str, float]) -> str | None:
    """A warning when the posterior has collapsed onto the prior: z then tells nothing of x."""
    if "active_units" not in metrics:  # the AE
        return None
    if metrics["active_units"] == 0 or metrics["test_kl"] < 0.1:
        return (f"posterior collapse: {metrics['active_units']} active units, KL "
                f"{metrics['test_kl']:.3f} nats; the decoder ignores z (try a lower model.kl_weight)")
    return None
