"""The classic MLP VAE (Kingma & Welling 2014), its loss and the IWAE bound, in plain PyTorch.

Reads like pytorch/examples `vae/main.py`: encoder -> (mu, log sigma^2), reparameterisation,
decoder -> 784 Bernoulli logits; the loss is a pure function beside the model. The Lightning
system that trains it lives in lit.py, so evaluating a model never imports Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGE_PIXELS = 28 * 28
LOG_2PI = math.log(2 * math.pi)


def mlp(widths: Sequence[int]) -> nn.Sequential:
    """Linear layers with ReLU between them, none after the last."""
    layers: list[nn.Module] = []
    for d_in, d_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class VAE(nn.Module):
    """variational=False is the plain autoencoder baseline: the same MLPs, z = mu, no logvar."""

    def __init__(self, hidden_dims: Sequence[int], latent_dim: int, variational: bool = True) -> None:
        super().__init__()
        self.latent_dim, self.variational = latent_dim, variational
        self.encoder = nn.Sequential(mlp([IMAGE_PIXELS, *hidden_dims]), nn.ReLU())
        self.mu = nn.Linear(hidden_dims[-1], latent_dim)
        self.logvar = nn.Linear(hidden_dims[-1], latent_dim) if variational else None
        self.decoder = mlp([latent_dim, *reversed(hidden_dims), IMAGE_PIXELS])

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        h = self.encoder(x)
        return self.mu(h), self.logvar(h) if self.variational else None  # (batch, latent_dim)

    def reparameterize(self, mu: Tensor, logvar: Tensor) -> Tensor:
        # z = mu + sigma * eps keeps z differentiable in mu and sigma.
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)  # (..., 784) Bernoulli logits

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar) if self.variational else mu
        return self.decode(z), mu, logvar

    def reconstruct(self, x: Tensor) -> Tensor:
        """The Bernoulli means of decode(mu): the deterministic reconstruction that figures show."""
        return torch.sigmoid(self.decode(self.encode(x)[0]))


def bernoulli_nll(logits: Tensor, x: Tensor) -> Tensor:
    """-log p(x | logits) summed over pixels, (...,) in nats: BCE with logits, x broadcast.

    BCE = softplus(l) - x * l, with softplus as relu(l) + log(1 + exp(-|l|)): PyTorch's CPU
    softplus and log-sigmoid kernels cost ~10 ns per element, this ~2 ns, and the IWAE bound runs
    it k times per image (benchmarks/evaluate_throughput.py). log(1 + tiny) rounding to 0 costs
    at most 1e-4 nats per image.
    """
    return (F.relu(logits) + torch.log(1 + torch.exp(-logits.abs())) - x * logits).sum(-1)


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(q(z_d|x) || N(0, 1)) per latent dimension, (..., latent_dim) in nats: the closed form of
    Kingma & Welling 2014, Appendix B."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())


def neg_elbo_terms(logits: Tensor, x: Tensor, mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image reconstruction -log p(x|z) and KL(q(z|x) || N(0, I)), both (batch,) in nats.
    -ELBO = recon + KL."""
    return bernoulli_nll(logits, x), kl_divergence(mu, logvar).sum(-1)


def iwae_loss_terms(vae: VAE, x: Tensor, k: int, kl_weight: float = 1.0) -> dict[str, Tensor]:
    """The k-sample IWAE training objective (Burda et al. 2016), per image (batch,) in nats:
    `loss` (kl_weight-weighted), `iwae_k` (the bound itself, -log p(x) <= it), and the first
    sample's `recon` and the closed-form `kl`, the VAE's -ELBO terms.

    The k samples go through the decoder together. Each log weight log p(x|z_i) - log q(z_i|x)/p(z_i)
    has its Monte Carlo KL, log q/p, replaced by the closed-form KL plus the sample's deviation from
    the k-sample mean: the normalised importance weights are IWAE's, the shared offset is the
    VAE's analytic KL (unbiased: the mean of log q/p estimates that KL). So k = 1 is the VAE's loss
    exactly, and kl_weight weighs the KL term of every weight, the beta-VAE at k = 1.
    """
    mu, logvar = vae.encode(x)
    eps = torch.randn(k, *mu.shape, device=x.device, dtype=x.dtype)  # k = 1: reparameterize's draws
    z = mu + eps * torch.exp(0.5 * logvar)  # (k, batch, latent)
    recon = bernoulli_nll(vae.decode(z), x)  # (k, batch)
    kl = kl_divergence(mu, logvar).sum(-1)
    log_q_over_p = 0.5 * (z.pow(2) - eps.pow(2) - logvar).sum(-1)  # the log 2 pi terms cancel
    kl_terms = kl + (log_q_over_p - log_q_over_p.mean(0))

    def neg_bound(beta: float) -> Tensor:
        return math.log(k) - torch.logsumexp(-(recon + beta * kl_terms), dim=0)

    loss = neg_bound(kl_weight)
    return {"recon": recon[0], "kl": kl, "loss": loss,
            "iwae_k": loss if kl_weight == 1 else neg_bound(1.0).detach()}


def iwae_nll(vae: VAE, x: Tensor, k: int, max_elements: int = 2**20,
             generator: torch.Generator | None = None) -> Tensor:
    """-log p(x) bounded with k importance samples (Burda et al. 2016), (batch,) in nats.

    log p(x) >= log (1/k) sum_k p(x, z_k) / q(z_k | x); k = 1 is the ELBO, larger k is tighter.
    The k samples go through the decoder together, in chunks of at most `max_elements` logits:
    2**20 floats (4 MiB) stay in cache, where 2**25 ran 1.5x slower. The noise comes from
    `generator` (torch's global one when None), so concurrent callers can each keep their own.
    """
    mu, logvar = vae.encode(x)
    std = torch.exp(0.5 * logvar)
    chunk = max(1, max_elements // (len(x) * IMAGE_PIXELS))
    # A running logsumexp over chunks: memory independent of k, so any k the config allows fits.
    log_sum = torch.full((len(x),), -math.inf, device=x.device, dtype=x.dtype)
    for start in range(0, k, chunk):
        eps = torch.randn(min(chunk, k - start), *mu.shape, device=x.device, dtype=x.dtype,
                          generator=generator)
        z = mu + std * eps  # (k_chunk, batch, latent)
        logits = vae.decode(z)  # (k_chunk, batch, 784)
        log_px_z = -bernoulli_nll(logits, x)
        log_pz = -0.5 * (z.pow(2) + LOG_2PI).sum(-1)
        log_qz = -0.5 * (eps.pow(2) + LOG_2PI + logvar).sum(-1)
        log_sum = torch.logaddexp(log_sum, torch.logsumexp(log_px_z + log_pz - log_qz, dim=0))
    return math.log(k) - log_sum
