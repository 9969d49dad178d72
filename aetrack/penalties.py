"""Penalties on an autoencoder's code: sparsity and contraction. Each is built from the config and
called with (input, encoder, code); each names the code activation it expects."""

from __future__ import annotations

import torch


class SparsityPenalty:
    """L1 on ReLU codes, or KL(rho || mean activation) on sigmoid codes (Ng, CS294A notes)."""

    def __init__(self, config):
        self.kind, self.weight, self.target = config.sparsity, config.sparsity_weight, config.sparsity_target
        self.activation = torch.sigmoid if self.kind == "kl" else torch.relu

    def __call__(self, x: torch.Tensor, code_fn, code: torch.Tensor) -> torch.Tensor:
        if self.kind == "l1":
            return self.weight * code.abs().sum(-1).mean()
        rho, rho_hat = self.target, code.mean(0).clamp(1e-6, 1 - 1e-6)
        kl = rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))
        return self.weight * kl.sum()


def jacobian_frobenius_sq(code_fn, x: torch.Tensor) -> torch.Tensor:
    """||d code / d x||_F^2 per example, exact: one batched vector-Jacobian product per code unit."""
    training = torch.is_grad_enabled()
    with torch.enable_grad():  # also under no_grad, for validation and evaluation
        x = x.detach().requires_grad_(True)
        code = code_fn(x)
        basis = torch.eye(code.shape[-1], device=x.device, dtype=code.dtype)
        # Examples are independent, so e_k broadcast over the batch gives row k of every example's Jacobian.
        cotangents = basis.unsqueeze(1).expand(-1, code.shape[0], -1)
        (rows,) = torch.autograd.grad(code, x, cotangents, is_grads_batched=True, create_graph=training)
    return rows.pow(2).flatten(2).sum(-1).sum(0)


class ContractivePenalty:
    """Squared Frobenius norm of the encoder's Jacobian (Rifai et al. 2011)."""

    activation = staticmethod(torch.sigmoid)

    def __init__(self, config):
        self.weight = config.contractive_weight

    def __call__(self, x: torch.Tensor, code_fn, code: torch.Tensor) -> torch.Tensor:
        return self.weight * jacobian_frobenius_sq(code_fn, x).mean()
