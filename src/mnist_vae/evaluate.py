"""Test metrics of a trained VAE, all in nats per image: -ELBO, its two terms, and the IWAE bound."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import Tensor

from .config import PipelineError
from .data import to_float
from .model import VAE, LitVAE, iwae_nll, neg_elbo_terms


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
    """Metrics over (N, 784) uint8 images. Seeded, so the same model gives the same numbers."""
    sums = torch.zeros(4, dtype=torch.float64)  # recon, kl, iwae, images
    means = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for chunk in images.split(batch_size):
            x = to_float(chunk)
            logits, mu, logvar = vae(x)
            recon, kl = neg_elbo_terms(logits, x, mu, logvar)
            iwae = iwae_nll(vae, x, iwae_samples)
            sums += torch.stack([recon.sum(), kl.sum(), iwae.sum(), recon.new_tensor(len(x))]).double()
            means.append(mu)
    recon, kl, iwae, n = sums.tolist()
    return {"test_neg_elbo": (recon + kl) / n, "test_recon": recon / n, "test_kl": kl / n,
            "test_iwae_nll": iwae / n, "n_test": int(n), "iwae_samples": iwae_samples,
            "active_units": active_units(torch.cat(means))}


ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016, section 5.2


def active_units(mu: Tensor) -> int:
    """Latent dimensions whose posterior mean varies with x: Cov_x(E_q[z_d]) > 0.01.
    The others carry no information about the image."""
    return int((mu.var(0) > ACTIVE_UNIT_THRESHOLD).sum())


@torch.inference_mode()
def kl_per_dimension(vae: VAE, images: Tensor) -> Tensor:
    """(latent_dim,) mean KL(q(z_d|x) || N(0, 1)) over the images, in nats: which dims are used."""
    mu, logvar = vae.encode(to_float(images))
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).mean(0)


def collapse_warning(metrics: dict[str, float]) -> str | None:
    """A warning when the posterior has collapsed onto the prior: z then tells nothing of x."""
    if metrics["active_units"] == 0 or metrics["test_kl"] < 0.1:
        return (f"posterior collapse: {metrics['active_units']} active units, KL "
                f"{metrics['test_kl']:.3f} nats; the decoder ignores z (try a lower model.kl_weight)")
    return None
