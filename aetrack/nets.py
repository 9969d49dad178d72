"""Encoder and decoder networks: MLP or convolutional, for any (C, H, W) input.

Both take an optional condition vector (a one-hot label for conditional models),
concatenated to the flattened input of the encoder's head and to the latent code.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class GatedLinear(nn.Module):
    """A gated dense layer, (W x + b) * sigmoid(V x + c) (Dauphin et al. 2017; the VampPrior paper's units)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.linear = nn.Linear(n_in, 2 * n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.linear(x).chunk(2, dim=-1)
        return value * torch.sigmoid(gate)


def hidden_layer(n_in: int, n_out: int, activation: str) -> list[nn.Module]:
    """One hidden layer: linear then the nonlinearity, or a gated layer (its own nonlinearity)."""
    if activation == "gated":
        return [GatedLinear(n_in, n_out)]
    return [nn.Linear(n_in, n_out), {"relu": nn.ReLU, "tanh": nn.Tanh, "softplus": nn.Softplus}[activation]()]


def mlp(sizes: list[int], activation: str = "relu", last_linear: bool = True) -> nn.Sequential:
    """Hidden layers with `activation`; the last layer linear (`last_linear`) or hidden like the others."""
    layers: list[nn.Module] = []
    pairs = list(zip(sizes, sizes[1:]))
    for i, (n_in, n_out) in enumerate(pairs):
        if i == len(pairs) - 1 and last_linear:
            layers.append(nn.Linear(n_in, n_out))
        else:
            layers += hidden_layer(n_in, n_out, activation)
    return nn.Sequential(*layers)


def conv_sizes(height: int, width: int, layers: int) -> list[tuple[int, int]]:
    """Spatial sizes after each stride-2 conv (kernel 3, padding 1): 28 -> 14 -> 7, 8 -> 4 -> 2, 32 -> 16 -> 8."""
    sizes = [(height, width)]
    for _ in range(layers):
        h, w = sizes[-1]
        sizes.append(((h - 1) // 2 + 1, (w - 1) // 2 + 1))
    return sizes


class Encoder(nn.Module):
    def __init__(self, shape: tuple[int, int, int], hidden: tuple[int, ...], out_dim: int, arch: str, cond_dim: int = 0,
                 activation: str = "relu"):
        super().__init__()
        channels, height, width = shape
        if arch == "conv":
            blocks: list[nn.Module] = []
            n_in = channels
            for n_out in hidden:
                blocks += [nn.Conv2d(n_in, n_out, 3, stride=2, padding=1), nn.ReLU()]
                n_in = n_out
            h, w = conv_sizes(height, width, len(hidden))[-1]
            self.features = nn.Sequential(*blocks, nn.Flatten())
            self.head = nn.Linear(n_in * h * w + cond_dim, out_dim)
        else:
            self.features = nn.Sequential(nn.Flatten(), mlp([math.prod(shape), *hidden], activation, last_linear=False))
            self.head = nn.Linear(hidden[-1] + cond_dim, out_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.read_out(self.features(x), cond)

    def read_out(self, features: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The output from `self.features(x)`: what a conditional model shares across the conditions it tries."""
        if cond is not None:
            features = torch.cat([features, cond], dim=-1)
        return self.head(features)


class Decoder(nn.Module):
    """Maps a latent code to per-pixel parameters (logits or means) of shape (C, H, W)."""

    def __init__(self, shape: tuple[int, int, int], hidden: tuple[int, ...], latent_dim: int, arch: str, cond_dim: int = 0,
                 activation: str = "relu"):
        super().__init__()
        self.shape = shape
        channels, height, width = shape
        if arch == "conv":
            sizes = conv_sizes(height, width, len(hidden))
            h, w = sizes[-1]
            self.stem = nn.Sequential(nn.Linear(latent_dim + cond_dim, hidden[-1] * h * w), nn.ReLU(), nn.Unflatten(1, (hidden[-1], h, w)))
            blocks: list[nn.Module] = []
            chans = list(reversed(hidden)) + [channels]
            targets = list(reversed(sizes[:-1]))
            for i, (n_in, n_out) in enumerate(zip(chans, chans[1:])):
                (th, tw), (ih, iw) = targets[i], sizes[len(hidden) - i]
                # output_padding picks the exact size the encoder came from (odd or even).
                padding = (th - (2 * ih - 1), tw - (2 * iw - 1))
                blocks.append(nn.ConvTranspose2d(n_in, n_out, 3, stride=2, padding=1, output_padding=padding))
                if i < len(hidden) - 1:
                    blocks.append(nn.ReLU())
            self.body = nn.Sequential(*blocks)
            # Transposed convolutions share their bias over pixels: this one is per pixel, like the MLP's last layer.
            self.pixel_bias = nn.Parameter(torch.zeros(shape))
        else:
            self.stem = mlp([latent_dim + cond_dim, *reversed(hidden), math.prod(shape)], activation)
            self.body = nn.Unflatten(1, shape)

    def forward(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is not None:
            z = torch.cat([z, cond], dim=-1)
        out = self.body(self.stem(z))
        return out + self.pixel_bias if hasattr(self, "pixel_bias") else out

    @torch.no_grad()
    def init_output_bias(self, mean_image: torch.Tensor) -> None:
        """Start from the logit of the data's mean image, so that early steps model digits, not the average grey
        (the initialisation of Burda et al. 2015's code and of Kingma's VAE; worth a few tenths of a nat)."""
        # the data may already be on the GPU while the model is not yet: the bias is set where the model is
        logit = torch.logit(mean_image.clamp(1e-3, 1 - 1e-3)).to(next(self.parameters()).device)
        if hasattr(self, "pixel_bias"):
            self.pixel_bias.copy_(logit - self.body[-1].bias.view(-1, 1, 1))
        else:
            self.stem[-1].bias.copy_(logit.flatten())
