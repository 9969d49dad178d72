"""Penalties on an autoencoder's code: sparsity and contraction. Each is built from the config and
called with (input, encoder, code); each names the code activation it expects."""

from __future__ import annotations

import torch


class SparsityPenalty:
    """L1 on ReLU codes, or KL(rho || mean activation) on sigmoid codes (Ng, CS294A notes)."""

    def __init__(self, config):
        self.kind, self.weight, self.target = config.sparsity, config.sparsity_weight, config.sparsity_target
        self.activation = torch.sigmoid if self.kind == "kl" else torch.relu
        self.needs_input_grad = False

    def __call__(self, x: torch.Tensor, code_fn, code: torch.Tensor) -> torch.Tensor:
        if self.kind == "l1":
            return self.weight * code.abs().sum(-1).mean()
        rho, rho_hat = self.target, code.mean(0).clamp(1e-6, 1 - 1e-6)
        kl = rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))
        return self.weight * kl.sum()


def _code_and_input(code_fn, x: torch.Tensor, code: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The code with a graph back to x: the one given when it was computed from an x that requires grad (the
    training forward pass), else a fresh encoding (under no_grad: validation and evaluation)."""
    if code is not None and x.requires_grad and code.grad_fn is not None:
        return x, code
    x = x.detach().requires_grad_(True)
    return x, code_fn(x)


def jacobian_frobenius_sq(code_fn, x: torch.Tensor, code: torch.Tensor | None = None) -> torch.Tensor:
    """||d code / d x||_F^2 per example, exact: one batched vector-Jacobian product per code unit."""
    training = torch.is_grad_enabled()
    with torch.enable_grad():  # also under no_grad, for validation and evaluation
        x, code = _code_and_input(code_fn, x, code)
        basis = torch.eye(code.shape[-1], device=x.device, dtype=code.dtype)
        # Examples are independent, so e_k broadcast over the batch gives row k of every example's Jacobian.
        cotangents = basis.unsqueeze(1).expand(-1, code.shape[0], -1)
        (rows,) = torch.autograd.grad(code, x, cotangents, is_grads_batched=True, create_graph=training)
    return rows.pow(2).flatten(2).sum(-1).sum(0)


def hutchinson_frobenius_sq(code_fn, x: torch.Tensor, code: torch.Tensor | None = None,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """An unbiased estimate of ||d code / d x||_F^2 per example from one vector-Jacobian product:
    E ||J^T u||^2 = tr(J J^T) for u with E[u u^T] = I (Hutchinson 1990; Rademacher u, the lowest-variance choice)."""
    training = torch.is_grad_enabled()
    with torch.enable_grad():
        x, code = _code_and_input(code_fn, x, code)
        probe = torch.randint(0, 2, code.shape, generator=generator, device=code.device).to(code.dtype) * 2 - 1
        (projected,) = torch.autograd.grad(code, x, probe, create_graph=training)
    return projected.pow(2).flatten(1).sum(-1)


ESTIMATORS = {"exact": jacobian_frobenius_sq, "hutchinson": hutchinson_frobenius_sq}


class ContractivePenalty:
    """Squared Frobenius norm of the encoder's Jacobian (Rifai et al. 2011), exact or estimated
    (--contractive-estimator). Wants the code computed from an input that requires grad, so that the
    Jacobian reuses the forward pass (`needs_input_grad`)."""

    activation = staticmethod(torch.sigmoid)
    needs_input_grad = True

    def __init__(self, config):
        self.weight = config.contractive_weight
        self.estimate = ESTIMATORS[config.contractive_estimator]

    def __call__(self, x: torch.Tensor, code_fn, code: torch.Tensor) -> torch.Tensor:
        return self.weight * self.estimate(code_fn, x, code).mean()
