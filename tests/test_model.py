"""The loss, the KL, the IWAE bound, and Lightning wiring on synthetic tensors."""

import math
import os
import pickle
import subprocess
import sys

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from mnist_vae.checkpoints import load_vae
from mnist_vae.errors import PipelineError
from mnist_vae.evaluate import active_units, collapse_warning, evaluate, kl_per_dimension
from mnist_vae.lit import LitVAE
from mnist_vae.model import VAE, iwae_loss_terms, iwae_nll, neg_elbo_terms


def test_neg_elbo_terms_match_a_hand_computation():
    logits = torch.tensor([[0.0, 2.0]])
    x = torch.tensor([[1.0, 0.25]])
    mu, logvar = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.0, math.log(4.0)]])
    recon, kl = neg_elbo_terms(logits, x, mu, logvar)
    sigmoid = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    expected_recon = -(math.log(sigmoid(0.0))
                       + 0.25 * math.log(sigmoid(2.0)) + 0.75 * math.log(1 - sigmoid(2.0)))
    # KL(N(m, s^2) || N(0, 1)) = (s^2 + m^2 - 1 - log s^2) / 2, per dimension
    expected_kl = (1 + 0.25 - 1 - 0) / 2 + (4 + 1 - 1 - math.log(4)) / 2
    assert recon.item() == pytest.approx(expected_recon, rel=1e-6)
    assert kl.item() == pytest.approx(expected_kl, rel=1e-6)


def test_closed_form_kl_matches_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.randn(1, 3), torch.randn(1, 3)
    _, kl = neg_elbo_terms(torch.zeros(1, 1), torch.zeros(1, 1), mu, logvar)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    z = q.sample((200_000,))
    monte_carlo = (q.log_prob(z) - torch.distributions.Normal(0.0, 1.0).log_prob(z)).sum(-1).mean()
    assert kl.item() == pytest.approx(monte_carlo.item(), abs=0.02)


def test_iwae_bound_is_below_neg_elbo_and_tightens_with_k():
    torch.manual_seed(0)
    vae = VAE([32], latent_dim=4)
    x = torch.rand(64, 784).round()
    with torch.no_grad():
        logits, mu, logvar = vae(x)
        recon, kl = neg_elbo_terms(logits, x, mu, logvar)
        nll = {k: iwae_nll(vae, x, k).mean().item() for k in (1, 10, 100)}
    assert nll[1] == pytest.approx((recon + kl).mean().item(), rel=0.01)  # k = 1 is the ELBO
    assert nll[100] < nll[10] < nll[1]


def test_iwae_chunking_gives_the_same_bound():
    vae = VAE([16], latent_dim=2)
    x = torch.rand(8, 784)
    with torch.no_grad():
        torch.manual_seed(1)
        whole = iwae_nll(vae, x, 7)
        torch.manual_seed(1)
        chunked = iwae_nll(vae, x, 7, max_elements=3 * 8 * 784)  # chunks of 3, 3, 1 samples
    torch.testing.assert_close(whole, chunked)


def losses_and_gradients(kind: str, kl_weight: float, iwae_k: int = 1) -> tuple[float, list[torch.Tensor]]:
    torch.manual_seed(0)
    module = LitVAE(hidden_dims=[32], latent_dim=4, kl_weight=kl_weight, lr=1e-3, weight_decay=0.1,
                    t_max=10, kind=kind, iwae_k=iwae_k)
    x = torch.rand(16, 784).round()
    torch.manual_seed(1)  # the same reparameterisation noise for both kinds
    loss = module._common_step((x, None), "train")
    loss.backward()
    return loss.item(), [p.grad for p in module.parameters()]


@pytest.mark.parametrize("kl_weight", [1.0, 0.3])
def test_the_iwae_objective_at_k_1_is_the_vae_loss_exactly(kl_weight):
    vae_loss, vae_grads = losses_and_gradients("vae", kl_weight)
    iwae_loss, iwae_grads = losses_and_gradients("iwae", kl_weight, iwae_k=1)
    assert iwae_loss == vae_loss
    for vae_grad, iwae_grad in zip(vae_grads, iwae_grads, strict=True):
        assert torch.equal(vae_grad, iwae_grad)
    _, other_grads = losses_and_gradients("iwae", kl_weight, iwae_k=2)  # the test can fail
    assert not all(torch.equal(a, b) for a, b in zip(vae_grads, other_grads, strict=True))


def test_the_iwae_objective_estimates_the_evaluation_bound_without_bias_and_tightens_with_k():
    torch.manual_seed(0)
    vae = VAE([32], latent_dim=4)
    x = torch.rand(8, 784).round()

    def draws(draw, n=2000):
        values = torch.stack([draw() for _ in range(n)]).double()
        return values.mean(0), values.var(0) / n

    with torch.no_grad():
        for k in (1, 10):  # the closed-form KL offset changes the variance, not the mean
            training, training_var = draws(lambda k=k: iwae_loss_terms(vae, x, k)["iwae_k"])
            evaluation, evaluation_var = draws(lambda k=k: iwae_nll(vae, x, k))
            z = (training - evaluation) / (training_var + evaluation_var).sqrt()
            assert z.abs().max() < 4, (k, z)
        terms = iwae_loss_terms(vae, x, 50)
    assert terms["iwae_k"].mean() < (terms["recon"] + terms["kl"]).mean()


def tiny_module() -> LitVAE:
    return LitVAE(hidden_dims=[16], latent_dim=2, kl_weight=1.0, lr=1e-3, weight_decay=0.1, t_max=10)


def synthetic_batches() -> DataLoader:
    images = torch.rand(64, 784)
    return DataLoader(TensorDataset(images, torch.zeros(64, dtype=torch.long)), batch_size=16)


def test_fast_dev_run_logs_beta_free_metrics():
    module = tiny_module()
    trainer = L.Trainer(fast_dev_run=True, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, synthetic_batches(), synthetic_batches())
    metrics = trainer.callback_metrics
    assert {"train_loss", "val_loss", "val_neg_elbo", "val_recon", "val_kl"} <= set(metrics)
    assert metrics["val_neg_elbo"] == pytest.approx(metrics["val_recon"] + metrics["val_kl"])


def test_non_finite_loss_names_epoch_step_and_fix():
    module = tiny_module()
    images = torch.full((32, 784), float("nan"))
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, accelerator="cpu")
    with pytest.raises(PipelineError, match=r"at epoch 0, step 0; lower train.lr"):
        trainer.fit(module, DataLoader(TensorDataset(images, torch.zeros(32)), batch_size=16))


def test_checkpoint_loads_weights_only_and_evaluates(tmp_path):
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, accelerator="cpu")
    trainer.fit(tiny_module(), synthetic_batches())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    assert "state_dict" in torch.load(path, weights_only=True)
    vae = load_vae(path)
    images = (torch.rand(10, 784) * 255).to(torch.uint8)
    metrics = evaluate(vae, images, iwae_samples=4, batch_size=4)
    assert metrics["n_test"] == 10
    assert metrics == evaluate(vae, images, iwae_samples=4, batch_size=4)  # seeded: reproducible


class _RunsCode:
    def __reduce__(self):
        return (exec, ("open('MARKER', 'w').write('pwned')",))


def test_checkpoint_carrying_code_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"payload": _RunsCode()}}, path)
    with pytest.raises(PipelineError, match="refused"):
        load_vae(path)
    assert not (tmp_path / "MARKER").exists()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_a_posterior_ignored_by_the_decoder_has_no_active_units_and_warns():
    torch.manual_seed(0)
    vae = VAE([32], latent_dim=3)
    images = (torch.rand(50, 784) * 255).to(torch.uint8)
    assert active_units(vae.encode(images.float() / 255)[0] * 100) == 3  # a code that varies
    with torch.no_grad():  # q(z|x) = N(0, I) whatever x: z carries nothing, the KL is 0
        for head in (vae.mu, vae.logvar):
            head.weight.zero_()
            head.bias.zero_()
    metrics = evaluate(vae, images, iwae_samples=2)
    assert metrics["active_units"] == 0 and metrics["test_kl"] == pytest.approx(0.0, abs=1e-6)
    assert "posterior collapse: 0 active units" in collapse_warning(metrics)
    torch.testing.assert_close(kl_per_dimension(vae, images), torch.zeros(3))


def test_frechet_distance_is_zero_for_a_set_with_itself_and_grows_with_a_shift():
    from mnist_vae.quality import frechet_distance

    features = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    shifted = [frechet_distance(features, features + shift) for shift in (0.5, 1.0, 2.0)]
    assert shifted == pytest.approx([8 * 0.25, 8 * 1.0, 8 * 4.0], rel=1e-6)  # |shift|^2 over 8 dims


def test_the_autoencoder_has_no_elbo_to_report():
    ae = VAE([16], latent_dim=2, variational=False)
    assert ae.logvar is None
    metrics = evaluate(ae, (torch.rand(20, 784) * 255).to(torch.uint8), iwae_samples=5)
    assert set(metrics) == {"test_recon", "n_test"}  # absent, not faked
    module = LitVAE(hidden_dims=[16], latent_dim=2, kl_weight=1.0, lr=1e-3, weight_decay=0.1,
                    t_max=10, kind="ae")
    trainer = L.Trainer(fast_dev_run=True, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, synthetic_batches(), synthetic_batches())
    assert {"train_loss", "val_loss", "val_recon"} <= set(trainer.callback_metrics)
    assert "val_neg_elbo" not in trainer.callback_metrics and "val_kl" not in trainer.callback_metrics


def test_the_iwae_logs_its_training_bound_beside_the_beta_free_elbo():
    module = LitVAE(hidden_dims=[16], latent_dim=2, kl_weight=1.0, lr=1e-3, weight_decay=0.1,
                    t_max=10, kind="iwae", iwae_k=5)
    assert module.monitor == "val_iwae_k"
    trainer = L.Trainer(fast_dev_run=True, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, synthetic_batches(), synthetic_batches())
    metrics = trainer.callback_metrics
    assert {"train_loss", "val_loss", "val_neg_elbo", "val_recon", "val_kl", "val_iwae_k"} <= set(metrics)
    assert metrics["val_neg_elbo"] == pytest.approx(metrics["val_recon"] + metrics["val_kl"])
    assert metrics["val_iwae_k"] == metrics["val_loss"]  # kl_weight 1: the loss is the bound
    assert metrics["val_iwae_k"] < metrics["val_neg_elbo"]


@pytest.mark.parametrize("set_up", [True, False])
def test_a_stage_flushes_subnormal_floats_to_zero_in_every_thread(set_up):
    # 2**20 elements: a parallel op, so torch's worker threads compute parts of it too.
    code = ("import os, torch; from mnist_vae.process import set_up_torch\n"
            f"if {set_up}: set_up_torch()\n"
            "x = torch.full((2**20,), 1e-39) * 1.0\n"
            "print(int((x == 0).sum()), torch.get_num_threads(), min(4, os.cpu_count()))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    zeros, threads, expected = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                              text=True, check=True).stdout.split()
    assert int(zeros) == (2**20 if set_up else 0)
    assert not set_up or threads == expected
