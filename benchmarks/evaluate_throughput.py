"""Evaluation cost in training epochs: `evaluate()` with the IWAE bound (k=100) over the test set.

What: the time of `mnist_vae.evaluate.evaluate(vae, images, iwae_samples=100)` over 10,000 test
images (Fashion-MNIST t10k when the system copy is installed, else synthetic), divided by the time
of one training epoch on 60,000 images: a bare PyTorch epoch of the same VAE (784-256-128-2, batch
128, fused AdamW lr 1e-3 wd 0.1, as the project trains, the project's `neg_elbo_terms` loss) in
the same process. Goal: at most
3, so the evaluate stage costs no more than a few of the 50 epochs the train stage runs.

How: paired, since separate runs on a shared 2-core machine are too noisy: the test set goes through
evaluate() in 20 slices of 500 images (its own batch size, so the work is the same as one call), and
after each slice 1/20 of the training epoch runs; a slowdown from another process falls on both.
The VAE evaluated is the one being trained; the cost does not depend on the weights. With
`--profile`, or by itself when the ratio is over the goal, torch.profiler shows where iwae_nll's
time goes on one 500-image batch, and iwae_nll is timed with smaller sample chunks (`max_elements`,
an argument it already takes).

Reading it: "s" is the median slice times the number of slices, "s all" the plain sum; images/s
and "samples/s" (evaluate's decoder passes, k per image) use "s". The last stdout line is
`ratio_to_epoch=X`: the median over slices of evaluate seconds per training second. Another process
slows the small training ops far more than evaluate's large ones (an epoch took 138 s instead of
1.7 s beside a test run), which no pairing evens out: past 10% of the CPU time taken by others
(from /proc/stat), rerun when idle.

    python benchmarks/evaluate_throughput.py [--iwae-samples 100] [--slices 20] [--profile] [--synthetic]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor

from cpu_noise import cpu_snapshot, others_cpu_share
from mnist_vae.data import to_float
from mnist_vae.download import SYSTEM_DIRS
from mnist_vae.evaluate import evaluate
from mnist_vae.idx import FILES, read_idx
from mnist_vae.model import VAE, iwae_nll, neg_elbo_terms
from mnist_vae.process import set_up_process, set_up_torch

GOAL = 3.0
BATCH_SIZE, LR, WEIGHT_DECAY = 128, 1e-3, 0.1


def load_images(synthetic: bool) -> tuple[Tensor, Tensor, str]:
    """(60000, 784) training and (10000, 784) test images, uint8."""
    folder = SYSTEM_DIRS["fashion-mnist"]
    paths = [folder / FILES[split][0] for split in ("train", "test")]
    if not synthetic and all(path.exists() for path in paths):
        train, test = (torch.from_numpy(read_idx(path).reshape(-1, 784).copy()) for path in paths)
        return train, test, f"Fashion-MNIST from {folder}"
    generator = torch.Generator().manual_seed(0)
    train, test = (torch.randint(0, 256, (n, 784), dtype=torch.uint8, generator=generator)
                   for n in (60_000, 10_000))
    return train, test, "synthetic images"


def train_steps(vae: VAE, optimizer: torch.optim.Optimizer, images: Tensor, batches: list[Tensor]) -> None:
    for index in batches:
        x = to_float(images[index])
        logits, mu, logvar = vae(x)
        recon, kl = neg_elbo_terms(logits, x, mu, logvar)
        optimizer.zero_grad()
        (recon + kl).mean().backward()
        optimizer.step()


def profile_iwae(vae: VAE, test: Tensor, k: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    x = to_float(test[:500])  # one evaluate() batch
    with torch.inference_mode():
        iwae_nll(vae, x, k)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            iwae_nll(vae, x, k)
        print(f"\niwae_nll(k={k}) on one batch of 500 images, by self CPU time:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
        # Round-robin, so a busy spell does not favour one chunk size; the minimum is the cost.
        chunks = {2**25: [], 2**22: [], 2**20: []}  # 2**20 is iwae_nll's default
        for _ in range(3):
            for max_elements, times in chunks.items():
                start = time.perf_counter()
                iwae_nll(vae, x, k, max_elements=max_elements)
                times.append(time.perf_counter() - start)
    for max_elements, times in chunks.items():
        samples = max(1, max_elements // (len(x) * 784))
        print(f"max_elements=2**{max_elements.bit_length() - 1:<3} ({samples:>2} samples a chunk, "
              f"{max_elements * 4 >> 20:>3} MiB a tensor): {min(times) * 1000:6.0f} ms a batch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iwae-samples", type=int, default=100, help="k of the IWAE bound (default 100)")
    parser.add_argument("--slices", type=int, default=20,
                        help="evaluate/train alternations, default 20: 500 test images a slice, evaluate()'s batch")
    parser.add_argument("--profile", action="store_true", help="profile iwae_nll even if within the goal")
    parser.add_argument("--synthetic", action="store_true", help="random images even if Fashion-MNIST is here")
    parser.add_argument("--fraction", type=float, default=1.0,
                        help="use this share of the images, train and test alike (default 1: all); for smoke tests")
    args = parser.parse_args()
    set_up_process()  # as the stages' commands do
    set_up_torch()

    train, test, source = load_images(args.synthetic)
    train, test = (images[:max(args.slices, round(len(images) * args.fraction))] for images in (train, test))
    torch.manual_seed(0)
    vae = VAE((256, 128), 2)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    batches = list(torch.randperm(len(train)).split(BATCH_SIZE))
    train_steps(vae, optimizer, train, batches[:5])  # warm-up: first-call costs are no one's epoch
    epoch_s, evaluate_s, results, cpu = [], [], [], cpu_snapshot()
    for i, test_slice in enumerate(test.tensor_split(args.slices)):
        start = time.perf_counter()
        results.append(evaluate(vae, test_slice, args.iwae_samples))
        middle = time.perf_counter()
        train_steps(vae, optimizer, train, batches[len(batches) * i // args.slices:
                                                   len(batches) * (i + 1) // args.slices])
        epoch_s.append(time.perf_counter() - middle)
        evaluate_s.append(middle - start)
    # Each slice pair is the same work, so the median slice is robust to a busy spell in a few.
    ratio = statistics.median(e / t for e, t in zip(evaluate_s, epoch_s, strict=True))
    epoch, evaluation = (statistics.median(times) * args.slices for times in (epoch_s, evaluate_s))
    iwae = sum(r["test_iwae_nll"] * r["n_test"] for r in results) / len(test)

    print(f"data: {len(train):,} training and {len(test):,} test images, {source}")
    print(f"{'':<18}{'images':>8}{'s':>8}{'s all':>8}{'images/s':>10}{'samples/s':>11}")
    print(f"{'training epoch':<18}{len(train):>8}{epoch:>8.2f}{sum(epoch_s):>8.2f}{len(train) / epoch:>10.0f}")
    print(f"{f'evaluate(k={args.iwae_samples})':<18}{len(test):>8}{evaluation:>8.2f}{sum(evaluate_s):>8.2f}"
          f"{len(test) / evaluation:>10.0f}{len(test) * args.iwae_samples / evaluation:>11.0f}")
    others = others_cpu_share(cpu)
    print(f"test_iwae_nll after one epoch: {iwae:.1f} nats; ratio over all slices "
          f"{sum(evaluate_s) / sum(epoch_s):.2f}, median slice {ratio:.2f} (goal <= {GOAL:.0f}); "
          f"other processes took {others:.0%} of the CPU time{'; rerun when idle' * (others > 0.1)}")
    if args.profile or ratio > GOAL:
        profile_iwae(vae, test, args.iwae_samples)
    print(f"ratio_to_epoch={ratio:.2f}")


if __name__ == "__main__":
    main()
