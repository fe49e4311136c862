"""Test metrics of a trained VAE, all in nats per image: -ELBO, its two terms, and the IWAE bound."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .cli import PipelineError
from .data import to_float
from .model import VAE, bernoulli_nll, iwae_nll, neg_elbo_terms


class UnsafeCheckpointError(PipelineError):
    """A file that would run pickled code if loaded without weights_only: never ignored."""


def load_checkpoint(path: Path | str, keys: tuple[str, ...] = ("state_dict", "hyper_parameters")) -> dict:
    """A checkpoint's contents, loaded with weights_only=True: one carrying pickled code is
    refused, never run. Every way it can be wrong is one PipelineError naming the file."""
    path = Path(path)
    if path.is_dir():
        raise PipelineError(f"{path}: a directory, not a checkpoint file; pass a .ckpt file the "
                            "train stage wrote, such as models/best.ckpt")
    if not path.is_file():
        raise PipelineError(f"{path}: no such checkpoint file; run `dvc repro train` first, or "
                            "pass a .ckpt file the train stage wrote")
    try:
        with warnings.catch_warnings():  # torch warns about unusual pickle protocols: noise here
            warnings.simplefilter("ignore")
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only names the blocked class ("GLOBAL posix.system") only for pickled code;
        # random bytes or a text file fail on an opcode instead.
        if "GLOBAL" in str(err):
            raise UnsafeCheckpointError(f"{path}: refused, it holds more than tensors and plain "
                                        "values (pickled code); load only checkpoints you trust") from None
        raise PipelineError(f"{path}: not a PyTorch checkpoint; pass a .ckpt file the train "
                            "stage wrote") from None
    except Exception:  # noqa: BLE001  the unpickler of an arbitrary file fails in arbitrary ways
        raise PipelineError(f"{path}: empty, truncated or not a PyTorch checkpoint; pass a .ckpt "
                            "file the train stage wrote") from None
    if not isinstance(saved, dict) or not set(keys) <= saved.keys():
        raise PipelineError(f"{path}: not a Lightning checkpoint of this project (a bare "
                            "state_dict?); pass a .ckpt file the train stage wrote")
    return saved


def load_vae(checkpoint: Path | str) -> VAE:
    """The VAE (or AE) of a train-stage checkpoint, in eval mode, without importing Lightning."""
    saved = load_checkpoint(checkpoint)
    hp = saved["hyper_parameters"]
    weights = {k.removeprefix("vae."): v for k, v in saved["state_dict"].items()
               if k.startswith("vae.")}
    try:
        vae = VAE(list(hp["hidden_dims"]), int(hp["latent_dim"]), variational=hp.get("kind", "vae") == "vae")
        vae.load_state_dict(weights)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        # load_state_dict's first line only says "Error(s) in loading"; the next names the tensor.
        reason = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()),
                      str(err).strip()).rstrip(".")
        raise PipelineError(f"{checkpoint}: its weights do not match its hyperparameters "
                            f"({reason}); pass a .ckpt file the train stage wrote") from None
    return vae.eval()


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
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).mean(0)


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
