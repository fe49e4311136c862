"""Config validation: one line naming the key, the value and what is expected."""

import dataclasses

import pytest
import torch  # noqa: F401  set_up_torch sets up torch once it is imported
import yaml

from mnist_vae.config import Config, ConfigError, load_config
from mnist_vae.errors import PipelineError
from mnist_vae.process import set_up_torch

from .conftest import ROOT


def test_params_yaml_is_the_documented_defaults():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg == Config()
    assert cfg.model.hidden_dims == (256, 128) and cfg.train.t_max == 100


@pytest.mark.parametrize("raw, message", [
    ({"model": {"latnt_dim": 4}}, "unknown key model.latnt_dim; did you mean model.latent_dim?"),
    ({"modle": {}}, "unknown key modle; did you mean model?"),
    ({"model": {"latent_dim": -1}}, "model.latent_dim = -1; expected an integer from 1 to 1,024"),
    ({"model": {"latent_dim": 100000}}, "model.latent_dim = 100000; expected an integer from 1 to 1,024"),
    ({"model": {"hidden_dims": [10**6]}}, "model.hidden_dims = [1000000]; expected a non-empty list"),
    ({"train": {"lr": float("inf")}}, "train.lr = inf; expected a finite number"),
    ({"model": {"kl_weight": float("inf")}}, "model.kl_weight = inf; expected a finite number"),
    ({"data": {"download_timeout_s": float("inf")}}, "data.download_timeout_s = inf; expected a finite"),
    ({"train": {"seed": -5}}, "train.seed = -5; expected an integer from 0 to 4,294,967,295"),
    ({"train": {"images_every_epochs": -1}}, "train.images_every_epochs = -1; expected an integer >= 0"),
    ({"evaluate": {"iwae_samples": 10**9}}, "evaluate.iwae_samples = 1000000000; expected an integer from 1 to 10,000"),
    ({"model": {"latent_dim": 2.5}}, "model.latent_dim = 2.5; expected an integer"),
    ({"model": {"latent_dim": True}}, "model.latent_dim = True; expected an integer"),
    ({"model": {"kl_weight": -0.1}}, "model.kl_weight = -0.1; expected a number >= 0"),
    ({"model": {"hidden_dims": []}}, "model.hidden_dims = []; expected a non-empty list"),
    ({"model": {"hidden_dims": 256}}, "model.hidden_dims = 256; expected a list"),
    ({"data": {"dataset": "cifar"}}, "data.dataset = 'cifar'; expected one of mnist, fashion-mnist"),
    ({"train": {"lr": "fast"}}, "train.lr = 'fast'; expected a number"),
    ({"train": 3}, "train is 3; expected a mapping"),
])
def test_bad_values_name_key_value_and_expectation(config_from, raw, message):
    with pytest.raises(ConfigError) as err:
        config_from(raw)
    text = str(err.value)
    assert message in text
    assert text.startswith("params.yaml: ") and "\n" not in text


def test_exponent_floats_as_dvc_writes_them_are_numbers(tmp_path):
    # `dvc exp run -S train.lr=1e-6` writes `lr: 1e-06`, which YAML 1.1 reads as a string.
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    text = yaml.safe_dump(params).replace("lr: 0.001", "lr: 1e-06")
    (tmp_path / "params.yaml").write_text(text)
    assert load_config(tmp_path / "params.yaml").train.lr == 1e-6


def test_ints_are_accepted_for_floats_and_lists_become_tuples(config_from):
    cfg = config_from({"model": {"kl_weight": 1, "hidden_dims": [64]}})
    assert cfg.model.kl_weight == 1.0 and isinstance(cfg.model.kl_weight, float)
    assert cfg.model.hidden_dims == (64,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.latent_dim = 3


def test_flat_names_match_dvc_set_syntax():
    flat = Config().flat()
    assert flat["model.latent_dim"] == 2 and flat["model.hidden_dims"] == [256, 128]
    assert set(yaml.safe_load((ROOT / "params.yaml").read_text())) == {k.split(".")[0] for k in flat}


@pytest.mark.parametrize("text, missing", [
    ("", "data and 6 more missing"),
    ("data: {}\n", "data.dataset and 13 more missing"),
])
def test_an_empty_or_partial_params_file_names_what_is_missing(tmp_path, text, missing):
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "params.yaml")
    assert str(err.value) == (f"{tmp_path / 'params.yaml'}: {missing}; every key must be set (the "
                              "project's params.yaml lists them all with their defaults)")


def test_invalid_yaml_is_one_line_naming_where(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    path.write_text("model:\n\tlatent_dim: 3\n")  # a tab
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: not valid YAML (found character '\\t' that cannot start any "
                              "token at line 2, column 1); fix the syntax")


@pytest.mark.parametrize("value", ["abc", "0", "-3", "4,2", "1000000"])
def test_a_thread_count_torch_would_ignore_is_refused(monkeypatch, value):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    with pytest.raises(PipelineError) as err:
        set_up_torch()
    assert str(err.value) == (f"OMP_NUM_THREADS = {value!r}: expected a thread count from 1 to 1,024; set "
                              "one, or unset it for the fixed 4 at which results repeat")


def test_a_key_given_twice_is_refused_as_dvc_refuses_it(tmp_path):
    text = (ROOT / "params.yaml").read_text().replace("  latent_dim: 2\n", "  latent_dim: 2\n  latent_dim: 8\n")
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "params.yaml")
    line = text.splitlines().index("  latent_dim: 8") + 1
    assert str(err.value) == (f"{tmp_path / 'params.yaml'}: line {line}: key 'latent_dim' appears twice in "
                              "one section; keep one of them")
