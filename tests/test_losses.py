"""The reconstruction likelihoods: their constants, and the Bernoulli NLL against torch's BCE (value, gradient,
extreme logits)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from aetrack.losses import reconstruction_nll


def test_log_constants():
    # The Gaussian likelihood's variance 1/2 makes the NLL the squared error plus log(pi)/2 per pixel.
    x = torch.full((1, 1, 2, 2), 0.25)
    logits = torch.zeros(1, 1, 2, 2)  # mean 0.5
    expected = 4 * ((0.5 - 0.25) ** 2 + 0.5 * math.log(math.pi))
    assert float(reconstruction_nll(logits, x, "gaussian")) == pytest.approx(expected)
    p = 0.5
    assert float(reconstruction_nll(logits, x, "bernoulli")) == pytest.approx(-4 * (0.25 * math.log(p) + 0.75 * math.log(1 - p)))


def test_bernoulli_nll_equals_torch_bce_in_value_and_gradient():
    torch.manual_seed(0)
    logits = (4 * torch.randn(16, 1, 8, 8, dtype=torch.float64)).requires_grad_(True)
    x = torch.rand(16, 1, 8, 8, dtype=torch.float64)
    ours = reconstruction_nll(logits, x, "bernoulli")
    theirs = F.binary_cross_entropy_with_logits(logits.float(), x.float(), reduction="none").flatten(1).sum(-1)
    assert ours.dtype == torch.float64  # double stays double (evaluation checks its sums in it)
    assert torch.allclose(ours, theirs.double(), rtol=1e-5, atol=1e-4)
    (grad_ours,) = torch.autograd.grad(ours.sum(), logits)
    assert torch.allclose(grad_ours.double(), (torch.sigmoid(logits) - x).detach(), atol=1e-6)


def test_bernoulli_nll_is_finite_at_extreme_logits_and_twice_differentiable():
    logits = torch.tensor([[-200.0, -30.0, 0.0, 30.0, 200.0]], requires_grad=True)
    x = torch.tensor([[0.0, 1.0, 0.5, 0.0, 1.0]])
    nll = reconstruction_nll(logits, x, "bernoulli")
    assert torch.isfinite(nll).all()
    assert torch.allclose(nll, F.binary_cross_entropy_with_logits(logits, x, reduction="sum").view(1), rtol=1e-6)
    (grad,) = torch.autograd.grad(nll.sum(), logits, create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), logits)
    p = torch.sigmoid(logits.detach())
    assert torch.allclose(second, p * (1 - p), atol=1e-6)  # d^2/dl^2 softplus(l) = sigmoid'(l)
