"""The Lightning system around the plain-PyTorch VAE: `LitVAE` (optimisation, per-epoch metrics)
and `VaeDataModule` (the in-memory splits). Only training imports this module."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor
from torch.utils.data import DataLoader

from .config import DataConfig, ModelConfig, TrainConfig
from .data import batches, load_split, split_train_val
from .errors import PipelineError
from .model import VAE, bernoulli_nll, iwae_loss_terms, neg_elbo_terms

VAL_BATCH_SIZE = 1024


class VaeDataModule(L.LightningDataModule):
    """The training split of data_dir, divided into train and validation with data.seed."""

    def __init__(self, data: DataConfig, train: TrainConfig, data_dir: Path) -> None:
        super().__init__()
        self.data_dir, self.val_fraction, self.seed = Path(data_dir), data.val_fraction, data.seed
        self.batch_size, self.binarize = train.batch_size, data.binarize == "dynamic"
        self.steps_per_call, self.shuffle_seed = train.steps_per_call, train.seed
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self.splits = split_train_val(*load_split("train", self.data_dir), self.val_fraction,
                                          self.seed, binarize_val=self.binarize)

    def _on_device(self, split: str) -> tuple[Tensor, Tensor]:
        # On a GPU the whole dataset (47 MB for 60,000 digits) lives on the device: no copy per step.
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        images, labels = self.splits[split]
        if images.device != device:
            self.splits[split] = images, labels = images.to(device), labels.to(device)
        return images, labels

    def _ranks(self) -> dict[str, int]:
        # Under DDP each rank batches its own share of both splits (fit() turns Lightning's
        # DistributedSampler off: it would wrap our batch sampler as if it yielded images).
        if self.trainer is None:
            return {"rank": 0, "world_size": 1}
        return {"rank": self.trainer.global_rank, "world_size": self.trainer.world_size}

    def train_dataloader(self) -> DataLoader:
        # K consecutive mini-batches as one: a shuffled order split into K * batch_size images is
        # the order split into batch_size, K at a time; LitVAE.training_step splits it again.
        # DDP reduces gradients once per forward of the wrapped module, so K is 1 there.
        k = self.steps_per_call if self.trainer is None or self.trainer.world_size == 1 else 1
        return batches(*self._on_device("train"), self.batch_size * k, shuffle=True,
                       binarize=self.binarize, seed=self.shuffle_seed, **self._ranks())

    def val_dataloader(self) -> DataLoader:
        # No gradients to keep: bigger batches, and Lightning's per-batch hooks run 8x less often.
        return batches(*self._on_device("val"), VAL_BATCH_SIZE, shuffle=False, **self._ranks())


class NonFiniteLossError(PipelineError):
    pass


class LitVAE(L.LightningModule):
    """Optimisation and per-epoch metrics around `VAE`. Hyperparameters are plain values, so
    checkpoints load with `torch.load(weights_only=True)`."""

    def __init__(self, hidden_dims: list[int], latent_dim: int, kl_weight: float,
                 lr: float, weight_decay: float, t_max: int, kind: str = "vae",
                 batch_size: int | None = None, iwae_k: int = 1) -> None:
        """batch_size: the images of one optimizer update; a training batch holding more is
        that many updates (train.steps_per_call). None: one update per batch, whatever its size.
        iwae_k: the importance samples of kind iwae."""
        super().__init__()
        self.save_hyperparameters()
        # Manual: K optimizer updates per training_step (train.steps_per_call), each exactly as
        # Lightning's automatic optimisation would make it.
        self.automatic_optimization = False
        self.vae = VAE(hidden_dims, latent_dim, variational=kind != "ae")
        # The checkpoint to keep: the bound the model is trained on, beta-free; the AE has no
        # ELBO, only its reconstruction.
        self.monitor = {"vae": "val_neg_elbo", "iwae": "val_iwae_k", "ae": "val_recon"}[kind]
        # Per-epoch running sums of the per-image terms and the images: logging each step costs
        # ~10% of a step.
        self.terms = ("recon", "kl", "loss", "iwae_k") if kind == "iwae" else ("recon", "kl", "loss")
        self._sums: dict[str, Tensor] = {}

    @classmethod
    def from_config(cls, model: ModelConfig, train: TrainConfig) -> LitVAE:
        return cls(hidden_dims=list(model.hidden_dims), latent_dim=model.latent_dim,
                   kl_weight=model.kl_weight, lr=train.lr, weight_decay=train.weight_decay,
                   t_max=train.t_max, kind=model.kind, batch_size=train.batch_size,
                   iwae_k=model.iwae_k)

    def _common_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, _ = batch  # (batch, 784) floats in [0, 1]
        if self.hparams.kind == "iwae":
            terms = iwae_loss_terms(self.vae, x, self.hparams.iwae_k, self.hparams.kl_weight)
        else:
            logits, mu, logvar = self.vae(x)
            if self.vae.variational:
                recon, kl = neg_elbo_terms(logits, x, mu, logvar)
            else:
                recon = bernoulli_nll(logits, x)
                kl = torch.zeros_like(recon)
            terms = {"recon": recon, "kl": kl, "loss": recon + self.hparams.kl_weight * kl}
        with torch.no_grad():
            step_sums = torch.stack([terms[name].sum() for name in self.terms] + [x.new_tensor(len(x))])
            self._sums[stage] = self._sums.get(stage, 0) + step_sums
        return terms["loss"].mean()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        # K consecutive mini-batches per call (train.steps_per_call, Keras' steps_per_execution),
        # so that Lightning's per-call Python is paid once for K updates. The updates are the K = 1
        # updates: same mini-batches in the same order, the same optimizer calls.
        optimizer = self.optimizers()
        step_size = self.hparams.batch_size or len(batch[0])
        steps = list(zip(batch[0].split(step_size), batch[1].split(step_size), strict=True))
        for images, labels in steps:
            loss = self._common_step((images, labels), "train")
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"training loss is {loss.item()} at epoch {self.current_epoch}, step "
                    f"{self.global_step}; lower train.lr (now {self.hparams.lr}) in params.yaml")
            if len(steps) == 1:  # Lightning's manual optimisation, as its docs write it (DDP too)
                optimizer.zero_grad()
                self.manual_backward(loss)
                optimizer.step()
            else:
                self._plain_update(optimizer, loss)

    def _plain_update(self, optimizer: LightningOptimizer, loss: Tensor) -> None:
        """One update on the plain optimizer, counted in global_step as Lightning counts its own.
        Lightning's wrappers also call every callback's on_before_backward, on_after_backward and
        on_before_optimizer_step (none of ours has them): ~5% of a step on 2 CPU cores. K > 1
        runs on one device only (VaeDataModule), so no strategy needs its backward hooks."""
        optimizer._on_before_step()  # the manual-optimisation loop's step counter (Lightning 2.6)
        optimizer.optimizer.zero_grad()
        loss.backward()
        optimizer.optimizer.step()
        optimizer._on_after_step()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._common_step(batch, "val")

    def on_train_epoch_start(self) -> None:
        self._sums.pop("train", None)

    def on_train_epoch_end(self) -> None:
        # The per-epoch cosine step, where automatic optimisation takes it: right after this
        # hook (FitLoop.on_advance_end), after validation and the checkpoints of the epoch.
        self.lr_schedulers().step()

    def on_validation_epoch_start(self) -> None:
        self._sums.pop("val", None)

    def on_validation_epoch_end(self) -> None:
        # Validation closes each training epoch, so the epoch's metrics are all known here.
        if self.trainer.sanity_checking:
            return
        # Under DDP each rank summed its own share: add the shares before dividing, so every
        # rank logs the whole-set value (a mean of per-rank means would weigh shares unequally).
        # A no-op on one device. Sorted: every rank must issue the all-reduces in one order.
        sums = {stage: self.trainer.strategy.reduce(self._sums[stage].clone(), reduce_op="sum")
                for stage in sorted(self._sums)}
        totals = {stage: dict(zip((*self.terms, "images"), stage_sums, strict=True))
                  for stage, stage_sums in sums.items()}
        metrics = {f"{stage}_loss": t["loss"] / t["images"] for stage, t in totals.items()}
        val, n = totals["val"], totals["val"]["images"]
        metrics["val_recon"] = val["recon"] / n
        if self.vae.variational:
            # val_neg_elbo and val_iwae_k are beta-free: runs with different kl_weight compare on
            # them fairly.
            metrics.update(val_kl=val["kl"] / n, val_neg_elbo=(val["recon"] + val["kl"]) / n)
        if "iwae_k" in val:
            metrics["val_iwae_k"] = val["iwae_k"] / n
        self.log(self.monitor, metrics.pop(self.monitor), prog_bar=True)
        self.log_dict(metrics)

    def configure_optimizers(self):
        # fused: one kernel for all parameters, 1.13x faster steps on CPU than the default loop.
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr,
                                      weight_decay=self.hparams.weight_decay, fused=True)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.hparams.t_max)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
