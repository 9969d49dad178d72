"""Priors p(z) and the posteriors q(z|x) that go with them.

A prior is an object with `log_prob`, `sample` and `kl`; any VAE takes any
prior. Each prior also says which posterior family its KL is finite for
(`posterior`), so the encoder's output is read the right way.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LOG_2PI = math.log(2 * math.pi)


def log_normal_components(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu_k, diag(exp(logvar_k))) for every z (..., D) and component k of mu, logvar (K, D): (..., K).

    The square is expanded, sum_d (z - mu)^2 / s^2 = z^2 . 1/s^2 - 2 z . mu/s^2 + mu^2 . 1/s^2, so that two matrix
    products do the work instead of a (..., K, D) tensor: for a VampPrior's 500 components, 5000 draws of 40
    dimensions, 35 times faster on one CPU thread, within 1e-4 nats of the float64 sum."""
    precision = torch.exp(-logvar)
    constant = -0.5 * (z.shape[-1] * LOG_2PI + logvar.sum(-1) + (mu * mu * precision).sum(-1))
    flat = z.reshape(-1, z.shape[-1])
    square = (flat * flat) @ precision.T - 2 * flat @ (mu * precision).T
    return (constant - 0.5 * square).view(*z.shape[:-1], -1)


class DiagonalGaussian:
    """q(z|x) = N(mu, diag(exp(logvar)))."""

    def __init__(self, mu: torch.Tensor, logvar: torch.Tensor):
        self.mu, self.logvar = mu, logvar.clamp(-12.0, 8.0)

    @classmethod
    def from_params(cls, params: torch.Tensor) -> DiagonalGaussian:
        mu, logvar = params.chunk(2, dim=-1)
        return cls(mu, logvar)

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    def rsample(self, samples: int | None = None) -> torch.Tensor:
        """Reparameterised draw; with `samples` the result has a leading sample axis."""
        shape = self.mu.shape if samples is None else (samples, *self.mu.shape)
        return self.mu + torch.exp(0.5 * self.logvar) * torch.randn(shape, device=self.mu.device)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z|x) summed over latent dimensions."""
        return -0.5 * (LOG_2PI + self.logvar + (z - self.mu) ** 2 / self.logvar.exp()).sum(-1)

    def detached(self) -> DiagonalGaussian:
        """The same density with its parameters cut from the graph (a gradient reaches the encoder only through z)."""
        return DiagonalGaussian(self.mu.detach(), self.logvar.detach())

    def kl_standard_normal(self) -> torch.Tensor:
        """KL(q || N(0, I)) per latent dimension, closed form (Kingma & Welling 2014, appendix B)."""
        return 0.5 * (self.mu**2 + self.logvar.exp() - 1.0 - self.logvar)


class Box:
    """q(z|x) uniform on the box [center - width/2, center + width/2], kept inside [-1, 1]^D.

    With a uniform prior on [-1, 1]^D, KL(q || p) = sum_d log(2 / width_d): finite and exact
    because the posterior's support lies inside the prior's.
    """

    def __init__(self, center: torch.Tensor, width: torch.Tensor):
        self.center, self.width = center, width

    @classmethod
    def from_params(cls, params: torch.Tensor) -> Box:
        raw_center, raw_width = params.chunk(2, dim=-1)
        width = 2.0 * torch.sigmoid(raw_width).clamp_min(1e-4)
        center = (1.0 - width / 2) * torch.tanh(raw_center)
        return cls(center, width)

    @property
    def mean(self) -> torch.Tensor:
        return self.center

    def rsample(self, samples: int | None = None) -> torch.Tensor:
        shape = self.center.shape if samples is None else (samples, *self.center.shape)
        return self.center + self.width * (torch.rand(shape, device=self.center.device) - 0.5)

    def detached(self) -> Box:
        return Box(self.center.detach(), self.width.detach())

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        inside = ((z - self.center).abs() <= self.width / 2 + 1e-6).all(-1)
        density = -torch.log(self.width).sum(-1)
        return torch.where(inside, density, torch.full_like(density, -math.inf))


class StandardNormal(nn.Module):
    posterior = DiagonalGaussian

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return -0.5 * (LOG_2PI + z**2).sum(-1)

    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0, device=None):
        return temperature * torch.randn(n, self.latent_dim, generator=generator, device=device)

    def kl(self, q: DiagonalGaussian, z: torch.Tensor) -> torch.Tensor:
        return q.kl_standard_normal().sum(-1)

    def kl_per_dim(self, q: DiagonalGaussian) -> torch.Tensor:
        return q.kl_standard_normal()


class Uniform(nn.Module):
    """p(z) uniform on [-1, 1]^D, paired with the Box posterior."""

    posterior = Box

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim

    def detached(self) -> Box:
        return Box(self.center.detach(), self.width.detach())

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        inside = (z.abs() <= 1.0 + 1e-6).all(-1)
        density = torch.full(z.shape[:-1], -self.latent_dim * math.log(2.0), device=z.device)
        return torch.where(inside, density, torch.full_like(density, -math.inf))

    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0, device=None):
        # Temperature shrinks the box towards its centre: the analogue of scaling Gaussian noise.
        return temperature * (2.0 * torch.rand(n, self.latent_dim, generator=generator, device=device) - 1.0)

    def kl(self, q: Box, z: torch.Tensor) -> torch.Tensor:
        return self.kl_per_dim(q).sum(-1)

    def kl_per_dim(self, q: Box) -> torch.Tensor:
        return torch.log(2.0 / q.width)


class MixtureOfGaussians(nn.Module):
    """p(z) = sum_k pi_k N(mu_k, diag(sigma_k^2)), all learnt; KL by one Monte Carlo sample."""

    posterior = DiagonalGaussian

    def __init__(self, latent_dim: int, components: int):
        super().__init__()
        self.latent_dim = latent_dim
        # Spread the means so that components do not start identical.
        self.means = nn.Parameter(torch.randn(components, latent_dim))
        self.logvars = nn.Parameter(torch.zeros(components, latent_dim))
        self.logits = nn.Parameter(torch.zeros(components))

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        log_normal = log_normal_components(z, self.means, self.logvars)
        return torch.logsumexp(log_normal + torch.log_softmax(self.logits, -1), dim=-1)

    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0, device=None):
        device = device or self.means.device
        probs = torch.softmax(self.logits.detach(), -1).to(device)
        component = torch.multinomial(probs, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.latent_dim, generator=generator, device=device)
        std = torch.exp(0.5 * self.logvars.detach()).to(device)
        return self.means.detach().to(device)[component] + temperature * std[component] * noise

    def kl(self, q: DiagonalGaussian, z: torch.Tensor) -> torch.Tensor:
        return q.log_prob(z) - self.log_prob(z)

    def kl_per_dim(self, q: DiagonalGaussian) -> torch.Tensor:
        # Not separable over dimensions; report the KL to N(0, I) per dimension as the usage signal.
        return q.kl_standard_normal()


class VampPrior(nn.Module):
    """p(z) = 1/K sum_k q(z | u_k) with learnt pseudo-inputs u_k (Tomczak & Welling 2018)."""

    posterior = DiagonalGaussian

    def __init__(self, latent_dim: int, components: int, input_shape: tuple[int, ...]):
        super().__init__()
        self.latent_dim = latent_dim
        # Pseudo-inputs live in logit space so that sigmoid keeps them valid images.
        self.pseudo_logits = nn.Parameter(0.1 * torch.randn(components, *input_shape))
        self.encode = None  # bound by the model to its encoder: x -> DiagonalGaussian

    def bind(self, encode) -> None:
        # A plain attribute would register the encoder twice in the state dict.
        object.__setattr__(self, "encode", encode)

    def components(self) -> DiagonalGaussian:
        return self.encode(torch.sigmoid(self.pseudo_logits))

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        q = self.components()
        return torch.logsumexp(log_normal_components(z, q.mu, q.logvar), dim=-1) - math.log(q.mu.shape[0])

    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0, device=None):
        with torch.no_grad():
            q = self.components()
        device = device or q.mu.device
        component = torch.randint(q.mu.shape[0], (n,), generator=generator, device=device)
        noise = torch.randn(n, self.latent_dim, generator=generator, device=device)
        mu, std = q.mu.to(device), torch.exp(0.5 * q.logvar).to(device)
        return mu[component] + temperature * std[component] * noise

    def kl(self, q: DiagonalGaussian, z: torch.Tensor) -> torch.Tensor:
        return q.log_prob(z) - self.log_prob(z)

    def kl_per_dim(self, q: DiagonalGaussian) -> torch.Tensor:
        return q.kl_standard_normal()


# One per name of config.PRIORS (the names the CLI and the tuning space offer): tests/test_written_once.py.
BUILDERS = {
    "normal": lambda latent_dim, components, input_shape: StandardNormal(latent_dim),
    "uniform": lambda latent_dim, components, input_shape: Uniform(latent_dim),
    "mog": lambda latent_dim, components, input_shape: MixtureOfGaussians(latent_dim, components),
    "vamp": lambda latent_dim, components, input_shape: VampPrior(latent_dim, components, input_shape),
}


def build_prior(name: str, latent_dim: int, components: int, input_shape: tuple[int, ...]) -> nn.Module:
    return BUILDERS[name](latent_dim, components, input_shape)
