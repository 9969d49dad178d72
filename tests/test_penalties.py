"""The contractive penalty (Rifai et al. 2011): the squared Frobenius norm of the encoder's Jacobian, exact or
estimated (`--contractive-estimator`), computed from the training forward pass without changing what it gives."""

from __future__ import annotations

import pytest
import torch

from aetrack import data as datasets
from aetrack.config import ConfigError, TrainConfig
from aetrack.losses import reconstruction_nll
from aetrack.models import build_model
from aetrack.penalties import hutchinson_frobenius_sq, jacobian_frobenius_sq


@pytest.fixture(scope="module")
def digits():
    return datasets.load("digits")


def test_contractive_penalty_equals_the_exact_jacobian_norm():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3), torch.nn.Sigmoid())
    x = torch.rand(4, 1, 3, 4)
    ours = jacobian_frobenius_sq(net, x)
    exact = torch.stack([torch.autograd.functional.jacobian(lambda v: net(v.unsqueeze(0))[0], xi).pow(2).sum() for xi in x])
    assert torch.allclose(ours, exact, rtol=1e-5)
    # It is differentiable with respect to the weights, so it can be trained on.
    assert ours.requires_grad
    ours.sum().backward()
    assert net[1].weight.grad is not None and net[1].weight.grad.abs().sum() > 0


def old_jacobian_frobenius_sq(code_fn, x):
    """The penalty as it was before issue 10: the code recomputed from a fresh copy of x."""
    training = torch.is_grad_enabled()
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        code = code_fn(x)
        basis = torch.eye(code.shape[-1], device=x.device, dtype=code.dtype)
        cotangents = basis.unsqueeze(1).expand(-1, code.shape[0], -1)
        (rows,) = torch.autograd.grad(code, x, cotangents, is_grads_batched=True, create_graph=training)
    return rows.pow(2).flatten(2).sum(-1).sum(0)


def cae(arch="mlp", **settings):
    config = TrainConfig(model="cae", arch=arch, hidden=(32, 16), latent_dim=6, contractive_weight=0.5, **settings)
    torch.manual_seed(0)
    return build_model(config, (1, 8, 8), 10)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_contractive_penalty_sharing_the_forward_pass_equals_the_old_one_in_value_and_gradient(digits, arch):
    model = cae(arch)
    x = digits.train_x[:32]
    out = model(x)
    old = 0.5 * old_jacobian_frobenius_sq(model.encode, x).mean()
    assert torch.allclose(out.parts["penalty"], old, rtol=1e-5)
    new_grads = torch.autograd.grad(out.parts["penalty"], list(model.encoder.parameters()))
    old_grads = torch.autograd.grad(old, list(model.encoder.parameters()))
    for new, before in zip(new_grads, old_grads):
        assert torch.allclose(new, before, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # validation: no graph from the forward pass, the code is recomputed
        assert torch.allclose(model(x).parts["penalty"], old.detach(), rtol=1e-5)


def test_contractive_penalty_does_not_change_the_reconstruction_gradient(digits):
    """x requires grad in the training pass now; the loss's gradients with respect to the weights must not move."""
    model = cae()
    x = digits.train_x[:32]
    out = model(x)
    grads = torch.autograd.grad(out.parts["recon_loss"], list(model.parameters()), allow_unused=True)
    code = model.encode(x)
    recon = reconstruction_nll(model.decoder(code), x, "bernoulli").mean()
    expected = torch.autograd.grad(recon, list(model.parameters()), allow_unused=True)
    for new, before in zip(grads, expected):
        assert (new is None and before is None) or torch.allclose(new, before, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_hutchinson_estimate_agrees_with_the_exact_norm(digits, arch):
    model = cae(arch)
    x = digits.train_x[:4]
    exact = jacobian_frobenius_sq(model.encode, x)
    probes = 4000  # each copy of an example gets its own probe; the mean's relative error is about 1 %
    copies = x.repeat(probes, 1, 1, 1)
    estimates = hutchinson_frobenius_sq(model.encode, copies, generator=torch.Generator().manual_seed(0))
    mean = estimates.view(probes, len(x)).mean(0)
    assert torch.allclose(mean, exact, rtol=0.05), (mean, exact)
    single = estimates.view(probes, len(x))[0]
    assert not torch.allclose(single, exact, rtol=1e-3)  # one probe is an estimate, not the value


def test_the_hutchinson_setting_makes_the_model_train_on_the_estimate(digits):
    """With `hutchinson` the model's penalty is a one-probe draw: it changes from draw to draw, misses the exact
    norm, and averages to it; with `exact` it is the exact norm every time. Ignoring the setting fails here."""
    with pytest.raises(ConfigError, match="contractive-estimator"):
        TrainConfig(model="cae", contractive_estimator="guess").validate()
    assert TrainConfig.from_params(TrainConfig(contractive_estimator="hutchinson").to_params()).contractive_estimator == "hutchinson"
    x = digits.train_x[:8]
    exact_model, estimating = cae(), cae(contractive_estimator="hutchinson")  # the same weights (seed 0)
    exact = 0.5 * jacobian_frobenius_sq(exact_model.encode, x).mean().detach()

    def penalty(model, seed, copies=1):
        torch.manual_seed(seed)
        return model(x.repeat(copies, 1, 1, 1)).parts["penalty"].detach()

    assert torch.allclose(penalty(exact_model, 1), exact, rtol=1e-5) and torch.allclose(penalty(exact_model, 2), exact, rtol=1e-5)
    first, second = penalty(estimating, 1), penalty(estimating, 2)
    assert not torch.allclose(first, second, rtol=1e-3), "the estimate does not change with its probe"
    assert not torch.allclose(first, exact, rtol=1e-3)
    # Unbiased: over 500 copies of the batch (a probe each) the mean penalty is the exact one.
    assert float(penalty(estimating, 3, copies=500)) == pytest.approx(float(exact), rel=0.05)
    out = estimating(x)
    out.loss.backward()
    assert estimating.encoder.head.weight.grad.abs().sum() > 0  # it is trained on
