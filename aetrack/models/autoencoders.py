"""Deterministic autoencoders: plain, denoising, sparse and contractive.

One class; the variants differ only by what they add to it: an input corruption
(dae) or a penalty on the code (sae, cae).
"""

from __future__ import annotations

import torch
from torch import nn

from aetrack.losses import reconstruction_nll, to_image
from aetrack.models import Output, register
from aetrack.nets import Decoder, Encoder


def corrupt(x: torch.Tensor, kind: str, level: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Corrupted copy of x in [0, 1]: additive Gaussian noise, masking noise, or salt-and-pepper noise."""
    if kind == "gaussian":
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        return (x + level * noise).clamp(0.0, 1.0)
    hit = torch.rand(x.shape, generator=generator, device=x.device) < level
    if kind == "masking":
        return x.masked_fill(hit, 0.0)
    salt = torch.rand(x.shape, generator=generator, device=x.device) < 0.5
    return torch.where(hit, salt.to(x.dtype), x)


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


@register("ae", description="plain autoencoder")
@register("dae", scopes=("noise",), denoising=True, description="denoising autoencoder")
@register("sae", scopes=("sparsity",), penalty=SparsityPenalty, description="sparse autoencoder")
@register("cae", scopes=("contractive",), penalty=ContractivePenalty, description="contractive autoencoder")
class Autoencoder(nn.Module):
    def __init__(self, config, shape, num_classes, *, denoising: bool = False, penalty=None):
        super().__init__()
        self.config = config
        self.encoder = Encoder(shape, config.hidden, config.latent_dim, config.arch)
        self.decoder = Decoder(shape, config.hidden, config.latent_dim, config.arch)
        self.denoising = denoising
        self.penalty = penalty(config) if penalty else None
        self.activation = self.penalty.activation if self.penalty else (lambda h: h)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.activation(self.encoder(x))

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return to_image(self.decoder(z))

    def corrupt(self, x: torch.Tensor, generator: torch.Generator | None = None, level: float | None = None) -> torch.Tensor:
        level = self.config.noise_level if level is None else level
        return corrupt(x, self.config.noise, level, generator)

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(self.encode(x))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, kl_scale: float = 1.0) -> Output:
        # A denoising autoencoder sees the corrupted input and is scored against the clean one.
        source = self.corrupt(x) if self.denoising else x
        code = self.encode(source)
        logits = self.decoder(code)
        recon_loss = reconstruction_nll(logits, x, self.config.likelihood).mean()
        parts = {"recon_loss": recon_loss}
        loss = recon_loss
        if self.penalty is not None:
            parts["penalty"] = self.penalty(source, self.encode, code)
            loss = loss + parts["penalty"]
        extras = {"noisy": source} if self.denoising else {}
        return Output(loss, parts, to_image(logits), code, extras)
