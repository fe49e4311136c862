"""Cost of training on the IWAE bound: an update of `model.kind: iwae` as a ratio to the VAE's.

What: one optimizer update (the project's `LitVAE._common_step`, backward, fused AdamW) of the IWAE
with k importance samples against the VAE's, same model (784-256-128-2 MLP), batch 128 and
images: Fashion-MNIST's training split when the system copy is installed, else synthetic. The k
samples share one encoder pass and go through the decoder together, so an update should cost at
most what k decoder passes add: ratio(k) <= 1 + (k - 1) * s, where s is the decoder's share of a
VAE update (its forward, the Bernoulli likelihood and their backward), timed here the same way.

How: paired, since separate runs on a shared 2-core machine differ by more than the effect: each
round takes one VAE update, one IWAE update per k and one decoder-only pass on the same batch, in
turn, each with its own weights and optimizer, after unmeasured warm-up rounds. Ratios are of
medians over rounds.

Reading it: one line per k, `k=5: 2.08x the VAE's update (decoder bound 2.61x)`, and the last line
`ratio_to_vae=k1:X,k5:Y,...`. k = 1 should read 1.00: the same arithmetic as the VAE.

    python benchmarks/iwae_cost.py [--k 1 5 50] [--rounds 200] [--synthetic]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor

from evaluate_throughput import load_images
from mnist_vae.data import to_float
from mnist_vae.lit import LitVAE
from mnist_vae.model import bernoulli_nll
from mnist_vae.process import set_up_process, set_up_torch

BATCH_SIZE, HIDDEN_DIMS, LATENT_DIM = 128, [256, 128], 2
WARM_UP_ROUNDS = 10


def module(kind: str, k: int = 1) -> tuple[LitVAE, torch.optim.Optimizer]:
    lit = LitVAE(hidden_dims=HIDDEN_DIMS, latent_dim=LATENT_DIM, kl_weight=1.0, lr=1e-3,
                 weight_decay=0.1, t_max=100, kind=kind, iwae_k=k)
    return lit, lit.configure_optimizers()["optimizer"]


def timed_update(lit: LitVAE, optimizer: torch.optim.Optimizer, x: Tensor) -> float:
    start = time.perf_counter()
    loss = lit._common_step((x, None), "train")
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def timed_decoder_pass(lit: LitVAE, x: Tensor, z: Tensor) -> float:
    start = time.perf_counter()
    bernoulli_nll(lit.vae.decode(z), x).mean().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 5, 50])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--synthetic", action="store_true", help="random images even if Fashion-MNIST is here")
    args = parser.parse_args()
    set_up_process()
    set_up_torch()
    torch.manual_seed(0)
    images, _, source = load_images(args.synthetic)  # the training split
    vae, iwaes = module("vae"), {k: module("iwae", k) for k in args.k}
    decoder_only = module("vae")[0]
    times: dict[str, list[float]] = {"vae": [], "decoder": [], **{f"k{k}": [] for k in args.k}}
    for round_ in range(WARM_UP_ROUNDS + args.rounds):
        x = to_float(images[torch.randint(0, len(images), (BATCH_SIZE,))])
        measured = {"vae": timed_update(*vae, x),
                    "decoder": timed_decoder_pass(decoder_only, x, torch.randn(BATCH_SIZE, LATENT_DIM))}
        measured |= {f"k{k}": timed_update(*iwaes[k], x) for k in args.k}
        if round_ >= WARM_UP_ROUNDS:
            for name, seconds in measured.items():
                times[name].append(seconds)
    median = {name: statistics.median(seconds) for name, seconds in times.items()}
    share = median["decoder"] / median["vae"]
    print(f"{source}, batch {BATCH_SIZE}, {args.rounds} paired rounds, {torch.get_num_threads()} threads; "
          f"VAE update {median['vae'] * 1e3:.2f} ms, decoder share {share:.2f}")
    ratios = {k: median[f"k{k}"] / median["vae"] for k in args.k}
    for k, ratio in ratios.items():
        print(f"k={k}: {ratio:.2f}x the VAE's update (decoder bound {1 + (k - 1) * share:.2f}x)")
    print("ratio_to_vae=" + ",".join(f"k{k}:{ratio:.2f}" for k, ratio in ratios.items()))


if __name__ == "__main__":
    main()
