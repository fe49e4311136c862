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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for chunk in images.split(batch_size):
            x = to_float(chunk)
            logits, mu, logvar = vae(x)
            recon, kl = neg_elbo_terms(logits, x, mu, logvar)
            iwae = iwae_nll(vae, x, iwae_samples)
            sums += torch.stack([recon.sum(), kl.sum(), iwae.sum(), recon.new_tensor(len(x))]).double()
    recon, kl, iwae, n = sums.tolist()
    return {"test_neg_elbo": (recon + kl) / n, "test_recon": recon / n, "test_kl": kl / n,
            "test_iwae_nll": iwae / n, "n_test": int(n), "iwae_samples": iwae_samples}
