"""Reconstruction likelihoods shared by every variant.

Decoders output logits; the image is sigmoid(logits) under both likelihoods, and
the reconstruction loss is the negative log-likelihood in nats per image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LIKELIHOODS = ("bernoulli", "gaussian")


def reconstruction_nll(logits: torch.Tensor, x: torch.Tensor, likelihood: str) -> torch.Tensor:
    """-log p(x|z) per example, summed over pixels."""
    if likelihood == "bernoulli":
        nll = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
        return nll.flatten(1).sum(-1)
    # Gaussian with fixed variance 1/2: -log N(x; mu, 1/2) = (x - mu)^2 + log(pi) / 2, i.e. MSE plus a constant.
    squared = (torch.sigmoid(logits) - x) ** 2
    return squared.flatten(1).sum(-1) + 0.5 * math.log(math.pi) * x[0].numel()


def to_image(logits: torch.Tensor) -> torch.Tensor:
    """Mean of p(x|z) in [0, 1]."""
    return torch.sigmoid(logits)
