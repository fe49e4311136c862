"""What the ELBO does not say: how good samples look and how much the code knows about the digit.

A small MLP classifier, trained by its own DVC stage on the training split, judges generated and
reconstructed images. `sample_fd` is the Frechet distance between its features of prior samples and
of test images: the FID recipe (Heusel et al. 2017) with this classifier instead of Inception, so
it compares runs of this project with each other and NOT with published FIDs.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoints import checkpoint_bytes, load_checkpoint
from .config import ClassifierConfig
from .data import to_float
from .errors import PipelineError
from .evaluate import encode
from .files import write_bytes
from .model import IMAGE_PIXELS, VAE, mlp

N_CLASSES = 10


class Classifier(nn.Module):
    def __init__(self, hidden_dims: list[int]) -> None:
        super().__init__()
        self.features = nn.Sequential(mlp([IMAGE_PIXELS, *hidden_dims]), nn.ReLU())
        self.head = nn.Linear(hidden_dims[-1], N_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # (batch, 10) logits


def train_classifier(images: Tensor, labels: Tensor, cfg: ClassifierConfig) -> Classifier:
    """A plain loop: a fixed recipe for a measuring tool, not a model under study."""
    torch.manual_seed(cfg.seed)
    model = Classifier(list(cfg.hidden_dims))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    for _ in range(cfg.max_epochs):
        for index in torch.randperm(len(images)).split(cfg.batch_size):
            loss = F.cross_entropy(model(to_float(images[index])), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.inference_mode()
def accuracy(model: Classifier, x: Tensor, labels: Tensor) -> float:
    return (model(x).argmax(1) == labels).float().mean().item()


def save_classifier(model: Classifier, hidden_dims: list[int], path: Path) -> None:
    write_bytes(path, checkpoint_bytes({"hidden_dims": hidden_dims, "state_dict": model.state_dict()}))


def load_classifier(path: Path) -> Classifier:
    if not Path(path).is_file():
        raise PipelineError(f"{path}: no classifier; run `dvc repro classifier`")
    saved = load_checkpoint(path, keys=("hidden_dims", "state_dict"))
    try:
        model = Classifier(list(saved["hidden_dims"]))
        model.load_state_dict(saved["state_dict"])
    except (TypeError, ValueError, RuntimeError) as err:
        raise PipelineError(f"{path}: its weights do not match its hidden_dims ({str(err).splitlines()[0]}); "
                            "run `dvc repro -f classifier`") from None
    return model.eval()


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Between Gaussians fitted to two feature sets (N, D): |mu_a - mu_b|^2
    + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)). The trace of the root is taken from the symmetric form
    C_a^(1/2) C_b C_a^(1/2), whose eigenvalues are real and non-negative."""
    a, b = a.double(), b.double()
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    distance = (a.mean(0) - b.mean(0)).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return max(0.0, distance.item())  # rounding can leave -1e-12 for identical sets


@torch.inference_mode()
def sample_quality(vae: VAE, classifier: Classifier, images: Tensor, labels: Tensor,
                   n_samples: int, seed: int) -> dict[str, float]:
    """sample_fd and sample_confidence of n_samples prior samples (decoder means), and the
    classifier's accuracy on reconstructions of the (N, 784) uint8 test images."""
    z = torch.randn(n_samples, vae.latent_dim, generator=torch.Generator().manual_seed(seed))
    samples = torch.sigmoid(vae.decode(z))
    x = to_float(images)
    reconstructions = vae.reconstruct(x)
    return {
        "sample_fd": frechet_distance(classifier.features(samples), classifier.features(x)),
        "sample_confidence": F.softmax(classifier(samples), 1).max(1).values.mean().item(),
        "recon_accuracy": accuracy(classifier, reconstructions, labels),
    }


def latent_probe_accuracy(vae: VAE, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
                          max_iter: int = 200) -> float:
    """Test accuracy of a linear classifier (multinomial logistic regression) on the latent means,
    fit on the training images': how much of the digit the code holds, linearly."""
    # Cloned: inference tensors take no gradients.
    z_train, z_test = (encode(vae, images)[0].clone() for images, _ in (train, test))
    mean, std = z_train.mean(0), z_train.std(0) + 1e-6
    probe = nn.Linear(vae.latent_dim, N_CLASSES)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(probe((z_train - mean) / std), train[1])
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.inference_mode():
        return (probe((z_test - mean) / std).argmax(1) == test[1]).float().mean().item()
