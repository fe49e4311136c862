"""Training speed of the project's `fit()` as a fraction of a bare PyTorch loop's, measured in pairs.

What: `mnist_vae.train.fit()` against the plainest loop doing the same work per epoch (the training
split, then one no-grad pass over the validation split) with the same model (784-256-128-2 MLP VAE,
batch 128, AdamW lr 1e-3 wd 0.1, summed BCE + KL averaged over the batch) on the same data: full
Fashion-MNIST when the system copy is installed, else 60,000 synthetic images.

How: on a shared 2-core machine two separate timed runs differ by more than the overhead we look
for, so both run in one process, in lockstep. A Lightning callback makes an independent bare model
(its own weights, optimizer and shuffling) take one timed step after every project step. A project
step is the wall time between two bare steps, so it holds everything fit() does between steps: data
fetch, Lightning hooks, the progress bar and, at epoch ends, validation, checkpoints, the History CSV
and MLflow logging. Load from other processes falls on both sides alike. fit() runs as
pipeline/train.py runs it: a real MLflow run (temp SQLite store), progress bar on, checkpoints and
history in a temp dir. The seed-style row repeats the pairing for the original tutorial's data path
(per-image PIL -> ToTensor -> flatten, DataLoader shuffle=True, Trainer defaults).

Reading it: ratio = sum(bare step s) / sum(project step s), the project's speed relative to the bare
loop: 1.00 is no overhead, 0.80 means fit() takes 25% longer. "median" compares typical steps only
(no epoch ends). "busy" counts pairs whose bare step ran over 3x its median: another process had
the cores. Such a slowdown falls on both sides, which weights those pairs heavily in the sums and
pulls the ratio towards 1 (contention slows the threaded kernels more than the Python overhead);
"quiet" is the ratio without them. If the two differ, rerun. `--self-check`
pairs the bare loop with itself and should give about 1.00. Peak RSS is ru_maxrss over data setup
and fit(), as in the train stage's process. The last stdout line is `ratio_to_bare_loop=X`.

    python benchmarks/train_throughput.py [--epochs 2] [--seed-steps 300] [--self-check] [--synthetic]
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

from mnist_vae import tracking
from mnist_vae.config import Config, DataConfig, ModelConfig, TrainConfig
from mnist_vae.data import FILES, SYSTEM_DIRS, VaeDataModule, download, idx_bytes
from mnist_vae.files import write_bytes
from mnist_vae.model import LitVAE
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
        recon = F.binary_cross_entropy_with_logits(self.decoder(z), x, reduction="none").sum(-1)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)
        return (recon + kl).mean()


class BareLoop:
    """One optimizer step per call over its own shuffle of `train`; after an epoch's last step, one
    no-grad pass over `val` (None: never)."""

    def __init__(self, train: Tensor, val: Tensor | None, seed: int) -> None:
        with torch.random.fork_rng(devices=[]):  # its own weights, without moving the project's seed
            torch.manual_seed(seed)
            self.model = BareVAE()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        self.train, self.val = train, val  # (N, 784) uint8
        self.generator = torch.Generator().manual_seed(seed)
        self.batches: list[Tensor] = []
        self.images, self.steps = 0, 0
        self.validated_at: list[int] = []  # step indices

    def step(self) -> None:
        if not self.batches:
            self.batches = list(torch.randperm(len(self.train), generator=self.generator).split(BATCH_SIZE))
        x = self.train[self.batches.pop()].float().div_(255)
        loss = self.model.loss(x)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.images += len(x)
        if not self.batches and self.val is not None:
            with torch.no_grad():
                for chunk in self.val.split(BATCH_SIZE):
                    self.model.loss(chunk.float().div_(255))
            self.validated_at.append(self.steps)
        self.steps += 1


class Paired(L.Callback):
    """Interleaves `bare` with whatever it is attached to: one bare step after each step there."""

    def __init__(self, bare: BareLoop) -> None:
        self.bare = bare
        self.project_s: list[float] = []
        self.bare_s: list[float] = []
        self.mark = 0.0

    def tick(self) -> None:
        start = time.perf_counter()
        self.bare.step()
        end = time.perf_counter()
        self.project_s.append(start - self.mark)
        self.bare_s.append(end - start)
        self.mark = end

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.mark = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args) -> None:
        self.tick()

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.project_s[-1] += time.perf_counter() - self.mark  # the last epoch's validation and saving

    def busy(self) -> list[bool]:
        """Pairs whose bare step took over 3x the median: another process had the cores. Epoch ends
        (the bare validation, then the project's in the next interval) are never counted."""
        limit = 3 * statistics.median(self.bare_s)
        ends = {*self.bare.validated_at, *(i + 1 for i in self.bare.validated_at)}
        return [s > limit and i not in ends for i, s in enumerate(self.bare_s)]

    def ratio(self, skip_busy: bool = False) -> float:
        keep = [not (skip_busy and busy) for busy in self.busy()]
        return (sum(s for s, k in zip(self.bare_s, keep) if k)
                / sum(s for s, k in zip(self.project_s, keep) if k))

    def row(self, name: str) -> str:
        n, project, bare = self.bare.images, sum(self.project_s), sum(self.bare_s)
        median = statistics.median(self.bare_s) / statistics.median(self.project_s)
        return (f"{name:<24}{len(self.bare_s):>6}{project:>8.2f}{bare:>8.2f}{n / project:>10.0f}"
                f"{n / bare:>10.0f}{sum(self.busy()):>6}{median:>8.2f}{self.ratio(True):>7.2f}"
                f"{self.ratio():>7.2f}")


class PilImages(Dataset):
    """The tutorial's data path, as torchvision's MNIST serves it: uint8 -> PIL image -> transform."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        from torchvision import transforms  # slow to import; only this row needs it

        self.images, self.labels = images.view(-1, 28, 28).numpy(), labels
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Lambda(torch.flatten)])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def write_data(folder: Path, synthetic: bool) -> tuple[DataConfig, str]:
    """A data/ folder as the download stage leaves it: Fashion-MNIST if installed, else random."""
    system = SYSTEM_DIRS["fashion-mnist"]
    if not synthetic and all((system / name).exists() for pair in FILES.values() for name in pair):
        cfg = DataConfig(dataset="fashion-mnist", source="local")
    else:
        rng, raw = np.random.default_rng(0), folder / "raw"
        for (images, labels), n in zip(FILES.values(), (60_000, 10_000)):
            write_bytes(raw / images, idx_bytes(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)))
            write_bytes(raw / labels, idx_bytes(rng.integers(0, 10, n, dtype=np.uint8)))
        cfg = DataConfig(dataset="fashion-mnist", source="local", local_dir=str(raw))
    info = download(cfg, folder / "data")
    return cfg, f"{info['n_images']['train']:,} images from {'synthetic' if cfg.local_dir else info['origin']}"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def reset_peak_rss() -> None:
    """Restart ru_maxrss from the current RSS (Linux >= 4.0), so the peak is the train stage's,
    not the download's; elsewhere the peak stays the process's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def seed_style(cfg: Config, data: VaeDataModule, steps: int) -> Paired:
    paired = Paired(BareLoop(data.splits["train"][0], None, seed=2))
    loader = DataLoader(PilImages(*data.splits["train"]), batch_size=BATCH_SIZE, shuffle=True)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, limit_val_batches=0, callbacks=[paired])
    trainer.fit(LitVAE.from_config(cfg.model, cfg.train), loader)
    return paired


def self_check(data: VaeDataModule, epochs: int) -> Paired:
    train, val = data.splits["train"][0], data.splits["val"][0]
    primary, paired = BareLoop(train, val, seed=1), Paired(BareLoop(train, val, seed=2))
    paired.on_train_start(None, None)
    for _ in range(epochs * -(-len(train) // BATCH_SIZE)):
        primary.step()
        paired.tick()
    paired.on_train_end(None, None)
    return paired


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs of fit() (default 2)")
    parser.add_argument("--seed-steps", type=int, default=300,
                        help="steps of the seed-style comparison; 0 skips it (default 300)")
    parser.add_argument("--self-check", action="store_true", help="pair the bare loop with itself")
    parser.add_argument("--synthetic", action="store_true", help="random images even if Fashion-MNIST is installed")
    args = parser.parse_args()
    imports_rss_mib = peak_rss_mib()
    # `import lightning` set this and fit() pops it; popped here too so --self-check runs as fit() does.
    os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data_cfg, data_desc = write_data(tmp, args.synthetic)
        cfg = replace(Config(), data=data_cfg, model=ModelConfig(hidden_dims=(256, 128), latent_dim=2),
                      train=replace(TrainConfig(), max_epochs=args.epochs, batch_size=BATCH_SIZE, lr=LR,
                                    weight_decay=WEIGHT_DECAY, accelerator="cpu"))
        reset_peak_rss()
        data = VaeDataModule(cfg.data, cfg.train, tmp / "data")
        data.setup()  # before fit(), as pipeline/train.py does
        header = (f"{'':<24}{'steps':>6}{'proj s':>8}{'bare s':>8}{'proj im/s':>10}{'bare im/s':>10}"
                  f"{'busy':>6}{'median':>8}{'quiet':>7}{'ratio':>7}")
        if args.self_check:
            paired = self_check(data, args.epochs)
            print(f"data: {data_desc}\n{header}\n{paired.row(f'bare vs bare, {args.epochs} epochs')}")
            print(f"self_check_ratio={paired.ratio():.2f}")
            return

        # The store lives in tmp, and so do its artifacts (MLflow's default is ./mlruns).
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        mlflow.create_experiment(tracking.EXPERIMENT, artifact_location=(tmp / "artifacts").as_uri())
        paired = Paired(BareLoop(data.splits["train"][0], data.splits["val"][0], seed=1))
        with tracking.pipeline_run(cfg, run_file=tmp / "mlflow_run.json") as run:
            result = fit(cfg, data, run.info.run_id, models_dir=tmp / "models",
                         history_file=tmp / "train_history.csv", callbacks=[paired])
        rss_mib = peak_rss_mib()
        assert len(result.history) == len(paired.bare.validated_at) == args.epochs, "unequal work"
        seed = seed_style(cfg, data, args.seed_steps) if args.seed_steps else None

    print(f"data: {data_desc}; fit() best val_neg_elbo {result.best['val_neg_elbo']:.1f} nats")
    print(header)
    print(paired.row(f"fit(), {args.epochs} epochs"))
    if seed is not None:
        print(seed.row(f"seed-style, {args.seed_steps} steps"))
    print(f"peak RSS of data setup + fit(): {rss_mib:.0f} MiB, of which {imports_rss_mib:.0f} MiB "
          "is the imports (torch, lightning, mlflow)")
    print(f"ratio_to_bare_loop={paired.ratio():.2f}")


if __name__ == "__main__":
    main()
