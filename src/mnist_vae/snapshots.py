"""Pictures of the model learning: reconstructions and prior samples logged to the MLflow run
with step = epoch, which MLflow's image view scrolls through. A Lightning callback, apart from
served.py so that serving never imports Lightning."""

from __future__ import annotations

import lightning as L
import mlflow
import numpy as np
import torch
from torch import Tensor

from .data import to_float

N_DIGITS = 8  # per row: 8 originals over their reconstructions, and an 8 x 8 grid of samples
SAMPLES_SEED = 0  # the same prior draws every time: the pictures differ only by the model


def tile(images: Tensor, columns: int) -> np.ndarray:
    """(n, 784) floats in [0, 1] -> one uint8 (rows * 28, columns * 28) image."""
    rows = -(-len(images) // columns)
    grid = torch.zeros(rows * columns, 28, 28)
    grid[:len(images)] = images.reshape(-1, 28, 28)
    grid = grid.reshape(rows, columns, 28, 28).permute(0, 2, 1, 3).reshape(rows * 28, columns * 28)
    return (grid.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


class EpochImages(L.Callback):
    """Every `every` epochs, at epoch 0 and at the last: the first validation digits over their
    reconstructions (key `reconstructions`) and, for the VAE, decoded prior draws (`prior_samples`)."""

    def __init__(self, run_id: str, every: int) -> None:
        self.run_id, self.every = run_id, every

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if trainer.sanity_checking or not (epoch % self.every == 0 or epoch == trainer.max_epochs - 1):
            return
        vae = module.vae
        images, _ = trainer.datamodule.splits["val"]
        x = to_float(images[:N_DIGITS]).to(module.device)
        was_training = vae.training
        vae.eval()
        with torch.inference_mode():
            recon = vae.reconstruct(x)
            pictures = {"reconstructions": tile(torch.cat([x, recon]).cpu(), N_DIGITS)}
            if vae.variational:
                z = torch.randn(N_DIGITS**2, vae.latent_dim,
                                generator=torch.Generator().manual_seed(SAMPLES_SEED))
                samples = torch.sigmoid(vae.decode(z.to(module.device)))
                pictures["prior_samples"] = tile(samples.cpu(), N_DIGITS)
        vae.train(was_training)
        client = mlflow.MlflowClient()
        for key, picture in pictures.items():
            client.log_image(self.run_id, picture, key=key, step=epoch)
