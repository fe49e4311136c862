"""Training speed of the project's `fit()` as a fraction of a bare PyTorch loop's, measured in pairs.

What: `mnist_vae.train.fit()` against the plainest loop doing the same work per epoch (the training
split, then a no-grad pass over the validation split in chunks of lit.VAL_BATCH_SIZE) with the same
model (784-256-128-2 MLP VAE, batch 128, fused AdamW lr 1e-3 wd 0.1, summed BCE + KL averaged over
the batch, the same math) on the same data: full Fashion-MNIST when the system copy is installed,
else 60,000 synthetic images.

How: separate timed runs on this shared 2-core machine differ by more than the overhead sought, so
a Lightning callback makes an independent bare model (own weights, optimizer, shuffling) take, after
each call of the project's training step, as many timed steps as that call made optimizer updates
(train.steps_per_call, K, of them), in the same process. A project call is the wall time between
two bare turns: all fit() does (data fetch, hooks, progress bar; at epoch ends validation,
checkpoints, History CSV, MLflow). fit() runs as pipeline/train.py runs it: a real MLflow run (temp
SQLite store), progress bar on, outputs in a temp dir; once with the default K and once for each
--steps-per-call value (1 by default), after an unmeasured warm-up fit() that takes the process's
one-time costs (lazy imports, the store's first writes). The seed-style row pairs the tutorial's
data path (per-image PIL -> ToTensor -> flatten, DataLoader shuffle=True, Trainer defaults) likewise.

Reading it: ratio = sum(bare step s) / sum(project step s): 1.00 is no overhead, 0.80 means fit()
takes 25% longer. "median" compares typical steps (no epoch ends). "others" is the share of the CPU
time other processes took meanwhile (from /proc/stat): pairing evens out short spells, but a long
one slows threaded kernels far more than Python code and pulls the ratio towards 1, hence a warning
past 10%. `--self-check` pairs the bare loop with itself: expect 1.00 +- 0.03. Peak RSS: ru_maxrss
over data setup and fit(), as in the train stage. The last stdout lines are
`ratio_to_bare_loop_k1=X` (one per --steps-per-call value) and `ratio_to_bare_loop=X` (default K).

    python benchmarks/train_throughput.py [--epochs 2] [--seed-steps 300] [--steps-per-call 1 4]
                                          [--self-check] [--synthetic] [--train-images N]
                                          [--accelerator gpu]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import lightning as L
import mlflow
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cpu_noise import cpu_snapshot, others_cpu_share
from mnist_vae import tracking
from mnist_vae.config import Config, DataConfig, ModelConfig, TrainConfig
from mnist_vae.download import SYSTEM_DIRS, download
from mnist_vae.files import write_bytes
from mnist_vae.idx import FILES, idx_bytes
from mnist_vae.lit import VAL_BATCH_SIZE, LitVAE, VaeDataModule
from mnist_vae.process import set_up_process, set_up_torch
from mnist_vae.train import fit

BATCH_SIZE, LR, WEIGHT_DECAY = 128, 1e-3, 0.1


class BareVAE(nn.Module):
    """The project's VAE written out again, so the baseline shares no code with what it measures."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU())
        self.mu, self.logvar = nn.Linear(128, 2), nn.Linear(128, 2)
        self.decoder = nn.Sequential(nn.Linear(2, 128), nn.ReLU(), nn.Linear(128, 256), nn.ReLU(),
                                     nn.Linear(256, 784))

    def loss(self, x: Tensor) -> Tensor:
        h = self.encoder(x)
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        logits = self.decoder(z)
        recon = (F.relu(logits) + torch.log(1 + torch.exp(-logits.abs())) - x * logits).sum(-1)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)
        return (recon + kl).mean()


class BareLoop:
    """One optimizer step per call over its own shuffles of `train` (N, 784) uint8; after each
    epoch's last step, a no-grad pass over `val` (None: never)."""

    def __init__(self, train: Tensor, val: Tensor | None, seed: int, device: str = "cpu") -> None:
        with torch.random.fork_rng(devices=[]):  # its own weights, leaving the global stream alone
            torch.manual_seed(seed)
            self.model = BareVAE().to(device)
        # On a GPU the data lives on the device, as fit() keeps it (VaeDataModule).
        train, val = train.to(device), val if val is None else val.to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY,
                                           fused=True)
        self.train, self.val, self.generator = train, val, torch.Generator().manual_seed(seed)
        self.batches: list[Tensor] = []
        self.images = self.steps = 0
        self.validated_at: list[int] = []  # step indices

    def step(self) -> None:
        if not self.batches:
            self.batches = list(torch.randperm(len(self.train), generator=self.generator).split(BATCH_SIZE))
        x = self.train[self.batches.pop()].float().div_(255)
        loss = self.model.loss(x)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        if not self.batches and self.val is not None:
            with torch.no_grad():
                for chunk in self.val.split(VAL_BATCH_SIZE):
                    self.model.loss(chunk.float().div_(255))
            self.validated_at.append(self.steps)
        self.images, self.steps = self.images + len(x), self.steps + 1


class Paired(L.Callback):
    """After each call of the Trainer's training step, times as many steps of `bare` as the call
    made optimizer updates (train.steps_per_call of them; the Trainer's global_step counts them)."""

    def __init__(self, bare: BareLoop) -> None:
        self.bare, self.project_s, self.bare_s, self.mark = bare, [], [], 0.0
        self.cpu, self.others, self.steps = cpu_snapshot(), 0.0, 0

    def on_train_start(self, *args) -> None:
        self.cpu, self.mark = cpu_snapshot(), time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        self.take(trainer.global_step - self.steps)

    def take(self, steps: int) -> None:
        sync()  # on a GPU, the project's queued kernels are its time, not the bare loop's
        start = time.perf_counter()
        for _ in range(steps):
            self.bare.step()
        sync()
        end = time.perf_counter()
        self.project_s.append(start - self.mark)
        self.bare_s.append(end - start)
        self.mark, self.steps = end, self.steps + steps

    def on_train_end(self, *args) -> None:
        self.project_s[-1] += time.perf_counter() - self.mark  # the last validation and checkpoint
        self.others = others_cpu_share(self.cpu)

    def warning(self) -> list[str]:
        warning = f"warning: other processes took {self.others:.0%} of the CPU time; rerun when idle"
        return [warning] * (self.others > 0.1)

    def ratio(self) -> float:
        return sum(self.bare_s) / sum(self.project_s)

    def row(self, name: str) -> str:
        n, project, bare = self.bare.images, sum(self.project_s), sum(self.bare_s)
        median = statistics.median(self.bare_s) / statistics.median(self.project_s)
        return (f"{name:<24}{self.steps:>6}{project:>8.2f}{bare:>8.2f}{n / project:>10.0f}"
                f"{n / bare:>10.0f}{self.others:>8.0%}{median:>8.2f}{self.ratio():>7.2f}")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


HEADER = (f"{'':<24}{'steps':>6}{'proj s':>8}{'bare s':>8}{'proj im/s':>10}{'bare im/s':>10}"
          f"{'others':>8}{'median':>8}{'ratio':>7}")


class PilImages(Dataset):
    """The tutorial's data path, as torchvision's MNIST serves it: uint8 -> PIL image -> transform."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        from torchvision import transforms  # slow to import; only the seed-style row needs it

        self.images, self.labels = images.view(-1, 28, 28).numpy(), labels
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Lambda(torch.flatten)])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def write_data(folder: Path, synthetic: bool, n_train: int = 60_000) -> tuple[DataConfig, str]:
    """A data/ folder as the download stage leaves it: Fashion-MNIST if installed, else random."""
    system = SYSTEM_DIRS["fashion-mnist"]
    if not synthetic and all((system / name).exists() for pair in FILES.values() for name in pair):
        cfg = DataConfig(dataset="fashion-mnist", source="local")
    else:
        rng, raw = np.random.default_rng(0), folder / "raw"
        for (images, labels), n in zip(FILES.values(), (n_train, max(1, n_train // 6)), strict=True):
            write_bytes(raw / images, idx_bytes(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)))
            write_bytes(raw / labels, idx_bytes(rng.integers(0, 10, n, dtype=np.uint8)))
        cfg = DataConfig(dataset="fashion-mnist", source="local", local_dir=str(raw))
    info = download(cfg, folder / "data")
    return cfg, f"{info.n_images['train']:,} images from {'synthetic' if cfg.local_dir else info.origin}"


def peak_rss_mib(reset: bool = False) -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    if reset:  # restart the peak from the current RSS (Linux >= 4.0): the train stage's, not ours
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
    return peak


def measure(args: argparse.Namespace, tmp: Path, imports_rss_mib: float) -> list[str]:
    """The report's lines; every file lands in tmp."""
    data_cfg, data_desc = write_data(tmp, args.synthetic, args.train_images)
    cfg = replace(Config(), data=data_cfg, model=ModelConfig(hidden_dims=(256, 128), latent_dim=2),
                  train=replace(TrainConfig(), max_epochs=args.epochs, batch_size=BATCH_SIZE, lr=LR,
                                weight_decay=WEIGHT_DECAY, accelerator=args.accelerator))
    peak_rss_mib(reset=True)
    data = VaeDataModule(cfg.data, cfg.train, tmp / "data")
    data.setup()  # before fit(), as pipeline/train.py does
    for split, n in (("train", args.train_images), ("val", max(1, args.train_images // 9))):
        data.splits[split] = tuple(t[:n] for t in data.splits[split])
    (train, _), (val, _) = data.splits["train"], data.splits["val"]
    data_desc += f", {len(train):,} for training"

    if args.self_check:
        primary = BareLoop(train, val, seed=1, device=args.device)
        paired = Paired(BareLoop(train, val, seed=2, device=args.device))
        paired.on_train_start()
        for _ in range(args.epochs * -(-len(train) // BATCH_SIZE)):
            primary.step()
            paired.take(1)
        paired.on_train_end()
        return [f"data: {data_desc}", HEADER, paired.row(f"bare vs bare, {args.epochs} epochs"),
                *paired.warning(), f"self_check_ratio={paired.ratio():.2f}"]  # expect 1.00 +- 0.03

    # The store and its artifacts live in tmp (MLflow's default artifact root is ./mlruns).
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.create_experiment(tracking.EXPERIMENT, artifact_location=(tmp / "artifacts").as_uri())
    lines, ratios, warnings = [f"data: {data_desc}", HEADER], {}, []
    # Unmeasured: a process's first fit() pays one-time costs (lazy imports, the store's first
    # writes) that a 2-epoch measurement would charge to whichever K came first.
    warm_up_cfg = replace(cfg, train=replace(cfg.train, max_epochs=1))
    warm_up = VaeDataModule(warm_up_cfg.data, warm_up_cfg.train, tmp / "data")
    warm_up.splits = {split: (x[:4 * BATCH_SIZE], y[:4 * BATCH_SIZE]) for split, (x, y) in data.splits.items()}
    with tracking.pipeline_run(warm_up_cfg) as run:
        fit(warm_up_cfg, warm_up, run.info.run_id, work_dir=tmp / "warm-up", progress=False)
    # The default K first (the ratio the goal is about), then the others (K = 1 by default).
    for k in dict.fromkeys([cfg.train.steps_per_call, *args.steps_per_call]):
        k_cfg = replace(cfg, train=replace(cfg.train, steps_per_call=k))
        k_data = VaeDataModule(k_cfg.data, k_cfg.train, tmp / "data")  # it batches K at a time
        k_data.splits = data.splits
        paired = Paired(BareLoop(train, val, seed=1, device=args.device))
        with tracking.pipeline_run(k_cfg) as run:
            result = fit(k_cfg, k_data, run.info.run_id, work_dir=tmp / f"checkpoints-{k}",
                         callbacks=[paired])
        assert len(result.history) == len(paired.bare.validated_at) == args.epochs, "unequal work"
        lines.append(paired.row(f"fit(), K={k}, {args.epochs} epochs"))
        ratios[k], warnings = paired.ratio(), warnings or paired.warning()
    rss_mib = peak_rss_mib()
    lines.append(f"fit() best val_neg_elbo {result.best['val_neg_elbo']:.1f} nats")

    if args.seed_steps:
        seed = Paired(BareLoop(train, None, seed=2))
        trainer = L.Trainer(max_steps=args.seed_steps, accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, limit_val_batches=0, callbacks=[seed],
                            enable_model_summary=False)
        loader = DataLoader(PilImages(*data.splits["train"]), batch_size=BATCH_SIZE, shuffle=True)
        trainer.fit(LitVAE.from_config(cfg.model, cfg.train), loader)
        lines.append(seed.row(f"seed-style, {args.seed_steps} steps"))
    default_k = cfg.train.steps_per_call
    return [*lines, *warnings, f"peak RSS of data setup + fit(): {rss_mib:.0f} MiB, of which the imports "
            f"(torch, lightning, mlflow) {imports_rss_mib:.0f} MiB",
            *(f"ratio_to_bare_loop_k{k}={ratio:.2f}" for k, ratio in ratios.items() if k != default_k),
            f"ratio_to_bare_loop={ratios[default_k]:.2f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs of fit() (default 2)")
    parser.add_argument("--seed-steps", type=int, default=300, help="steps of the seed-style row; 0 skips it")
    parser.add_argument("--self-check", action="store_true", help="pair the bare loop with itself")
    parser.add_argument("--synthetic", action="store_true", help="random images even if Fashion-MNIST is here")
    parser.add_argument("--steps-per-call", type=int, nargs="*", default=[1], metavar="K",
                        help="values of train.steps_per_call to pair besides the default (default: 1)")
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu",
                        help="where both loops train (default cpu); gpu pairs them on the first GPU")
    parser.add_argument("--train-images", type=int, default=60_000,
                        help="train on at most this many images (default 60,000: all); for smoke tests")
    args = parser.parse_args()
    args.device = "cuda" if args.accelerator == "gpu" else "cpu"
    imports_rss_mib = peak_rss_mib()
    set_up_process()  # as the train stage's command does (the bare loop too: one process)
    set_up_torch()
    with tempfile.TemporaryDirectory() as tmp:
        lines = measure(args, Path(tmp), imports_rss_mib)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
