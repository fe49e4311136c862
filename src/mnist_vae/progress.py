"""What a fit shows while it runs: a bar counted in images on a terminal, one line per epoch in a
log file, and one closing line."""

from __future__ import annotations

import logging
import sys
import time
from typing import Protocol, TextIO

import lightning as L
from tqdm import tqdm

log = logging.getLogger("mnist_vae.train")  # the name its lines had in train.py


class Rows(Protocol):
    rows: list[dict[str, float]]  # train.History: every epoch's metrics, those before a resume too


class EpochLines(L.Callback):
    """One line per epoch, for logs that are files (a progress bar there is ~1,000 lines)."""

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = "  ".join(f"{k} {float(v):.2f}" for k, v in sorted(trainer.callback_metrics.items()))
        log.info("epoch %d/%d  %s  (%.1f s)", trainer.current_epoch, trainer.max_epochs - 1,
                 metrics, time.perf_counter() - self.started)


class ImageBar(L.Callback):
    """A bar per epoch counted in images, advanced after every optimizer update: Lightning's own
    counts calls, and at train.steps_per_call 16 an epoch of the offline sample is 2 calls, so
    it sat at 0/2 while the epochs went by. A step hook on the optimizer sees each update,
    whichever loop makes it. The last epoch's val_neg_elbo (val_recon for the AE) rides along,
    to two decimals: three significant digits show 160 for a whole run."""

    def __init__(self, file: TextIO | None = None, mininterval: float = 0.2) -> None:
        self.file, self.mininterval, self.bar, self.shown = file, mininterval, None, ""

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.step_images = module.hparams.batch_size
        self.hook = trainer.optimizers[0].register_step_post_hook(lambda *_: self._advance())

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        images = len(trainer.datamodule.splits["train"][0]) // trainer.world_size
        self.bar = tqdm(total=images, unit="img", unit_scale=True, file=self.file or sys.stderr,
                        desc=f"epoch {trainer.current_epoch}/{trainer.max_epochs - 1}",
                        postfix=self.shown, dynamic_ncols=True, mininterval=self.mininterval)

    def _advance(self) -> None:
        if self.bar is not None:  # the last batch of an epoch may be short: the bar ends at its total
            self.bar.update(min(self.step_images, self.bar.total - self.bar.n))

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.bar is None:
            return
        self.shown = f"{module.monitor} {float(trainer.callback_metrics[module.monitor]):.2f}"
        self.bar.set_postfix_str(self.shown, refresh=False)
        self.bar.close()
        self.bar = None

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.hook.remove()
        if self.bar is not None:
            self.bar.close()


class Summary(L.Callback):
    """One closing line: epochs, time, images/s and the best epoch, on a terminal or in a log."""

    def __init__(self, history: Rows, monitor: str) -> None:
        self.history, self.monitor = history, monitor

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.started, self.first_epoch = time.perf_counter(), trainer.current_epoch

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        epochs = trainer.current_epoch - self.first_epoch
        if not trainer.is_global_zero or not self.history.rows or epochs < 1:
            return
        seconds = time.perf_counter() - self.started
        images = epochs * len(trainer.datamodule.splits["train"][0])
        best = min(self.history.rows, key=lambda row: row[self.monitor])
        log.info("trained %d epochs in %.1f s (%s images/s); best epoch %d: %s %.2f", epochs, seconds,
                 f"{images / seconds:,.0f}", best["epoch"], self.monitor, best[self.monitor])
