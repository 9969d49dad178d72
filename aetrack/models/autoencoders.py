"""Deterministic autoencoders: plain, denoising, sparse and contractive.

One class; the variants differ only by what they add to it: an input corruption
(dae) or a penalty on the code (sae, cae, see aetrack.penalties).
"""

from __future__ import annotations

import torch
from torch import nn

from aetrack.losses import reconstruction_nll, to_image
from aetrack.models import Output, register
from aetrack.nets import Decoder, Encoder
from aetrack.penalties import ContractivePenalty, SparsityPenalty


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


@register("ae", description="plain autoencoder")
@register("dae", scopes=("noise",), denoising=True, description="denoising autoencoder")
@register("sae", scopes=("sparsity",), penalty=SparsityPenalty, description="sparse autoencoder")
@register("cae", scopes=("contractive",), penalty=ContractivePenalty, description="contractive autoencoder")
class Autoencoder(nn.Module):
    def __init__(self, config, shape, num_classes, *, denoising: bool = False, penalty=None):
        super().__init__()
        self.config = config
        self.encoder = Encoder(shape, config.hidden, config.latent_dim, config.arch, activation=config.activation)
        self.decoder = Decoder(shape, config.hidden, config.latent_dim, config.arch, activation=config.activation)
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
        if self.penalty is not None and self.penalty.needs_input_grad and torch.is_grad_enabled():
            source = source.detach().requires_grad_(True)  # the penalty differentiates this forward pass's code
        code = self.encode(source)
        logits = self.decoder(code)
        recon_loss = reconstruction_nll(logits, x, self.config.likelihood).mean()
        parts = {"recon_loss": recon_loss}
        loss = recon_loss
        if self.penalty is not None:
            parts["penalty"] = self.penalty(source, self.encode, code)
            loss = loss + parts["penalty"]
        extras = {"noisy": source.detach()} if self.denoising else {}
        return Output(loss, parts, to_image(logits), code, extras)
