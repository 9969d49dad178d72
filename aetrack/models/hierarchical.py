"""A VAE with two stochastic layers, x -> z1 -> z2: Burda et al. 2015's two-layer architecture.

q(z1|x) q(z2|z1) and p(z2) p(z1|z2) p(x|z1). `--hidden` sizes the networks between x and z1 (200-200 in the paper),
`--latent-hidden` those between z1 and z2 (100-100), `--first-latent-dim` is z1's size (100) and `--latent-dim` z2's
(50): the top code, the one the prior samples, `encode` returns and serving decodes. p(z2) is any prior (`--prior`).
The objectives are the VAE's, `--objective elbo` or `iwae` with `--train-samples K`, the bound written once in
aetrack.losses.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from aetrack.config import ConfigError
from aetrack.losses import importance_weighted_nll, reconstruction_nll, to_image
from aetrack.models import Output, register
from aetrack.nets import Decoder, Encoder, mlp
from aetrack.priors import DiagonalGaussian, build_prior


@register("hvae", scopes=("variational", "importance", "hierarchical"), generative=True,
          description="VAE with two stochastic layers, x -> z1 -> z2 (Burda et al. 2015; ELBO or IWAE objective)")
class HierarchicalVAE(nn.Module):
    def __init__(self, config, shape, num_classes):
        super().__init__()
        if config.objective == "iwae-dreg":
            raise ConfigError("--objective iwae-dreg is written for one stochastic layer; --model hvae takes elbo or iwae")
        self.config, self.num_classes = config, num_classes
        first, top, activation = config.first_latent_dim, config.latent_dim, config.activation
        self.likelihood = partial(reconstruction_nll, likelihood=config.likelihood)
        self.prior = build_prior(config.prior, top, config.prior_components, shape)                   # p(z2)
        self.encoder = Encoder(shape, config.hidden, 2 * first, config.arch, activation=activation)   # q(z1|x)
        self.top_encoder = mlp([first, *config.latent_hidden, 2 * top], activation)                   # q(z2|z1)
        self.top_decoder = mlp([top, *reversed(config.latent_hidden), 2 * first], activation)         # p(z1|z2)
        self.decoder = Decoder(shape, config.hidden, first, config.arch, activation=activation)       # p(x|z1)
        if hasattr(self.prior, "bind"):
            # VampPrior: a pseudo-input's top posterior, through the mean of its q(z1|u).
            self.prior.bind(lambda u: self.top_posterior(self.first_posterior(u).mean))

    def first_posterior(self, x: torch.Tensor) -> DiagonalGaussian:
        """q(z1|x)."""
        return DiagonalGaussian.from_params(self.encoder(x))

    def top_posterior(self, z1: torch.Tensor):
        """q(z2|z1), of the family the prior's KL is finite for; z1 may carry leading sample axes."""
        return self.prior.posterior.from_params(self.top_encoder(z1))

    def first_conditional(self, z2: torch.Tensor) -> DiagonalGaussian:
        """p(z1|z2)."""
        return DiagonalGaussian.from_params(self.top_decoder(z2))

    def terms(self, x: torch.Tensor, samples: int):
        """K draws z1_k ~ q(z1|x), z2_k ~ q(z2|z1_k): log p(x|z1_k) and log p(z1_k|z2_k) - log q(z1_k|x), each (K, B);
        q(z2|z1_k) and z2_k for the top layer's terms, the first draw's decoder logits, and q(z1|x)."""
        q1 = self.first_posterior(x)
        z1 = q1.rsample(samples)                                   # (K, B, first)
        q2 = self.top_posterior(z1)
        z2 = q2.rsample()                                          # (K, B, top)
        logits = self.decoder(z1.reshape(-1, z1.shape[-1]))
        target = x.repeat(samples, *([1] * (x.dim() - 1)))
        log_px = -self.likelihood(logits, target).view(samples, -1)
        lower = self.first_conditional(z2).log_prob(z1) - q1.log_prob(z1)
        return log_px, lower, q2, z2, logits[:len(x)], q1

    def log_weights(self, x: torch.Tensor, y: torch.Tensor | None, samples: int) -> torch.Tensor:
        """(k, B) importance log-weights log p(x, z1_k, z2_k) - log q(z1_k, z2_k|x) (Burda et al. 2015)."""
        log_px, lower, q2, z2, *_ = self.terms(x, samples)
        return log_px + lower + self.prior.log_prob(z2) - q2.log_prob(z2)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, kl_scale: float = 1.0) -> Output:
        """The ELBO, its top KL from the prior (closed form for N(0, I)) and z1's by one sample; or with --objective
        iwae the K-sample bound. `kl` is both layers' (log q - log p), weighed by beta and the warm-up."""
        kl_weight = self.config.beta * kl_scale
        log_px, lower, q2, z2, logits, q1 = self.terms(x, self.config.train_samples)
        parts = {}
        if self.config.objective == "elbo":
            kl = (self.prior.kl(q2, z2) - lower).mean(0)
            loss = -log_px.mean(0) + kl_weight * kl
        else:
            log_ratio = lower + self.prior.log_prob(z2) - q2.log_prob(z2)
            kl = -log_ratio.mean(0)
            loss = importance_weighted_nll(log_px, log_ratio, kl_weight)
            parts["neg_iwae"] = importance_weighted_nll(log_px, log_ratio).mean()
        recon_loss, kl = -log_px.mean(), kl.mean()
        # neg_elbo is the bound itself (beta = 1), whatever beta is trained with.
        parts = {"recon_loss": recon_loss, "kl": kl, "neg_elbo": recon_loss + kl, **parts}
        return Output(loss.mean(), parts, to_image(logits), self.top_posterior(q1.mean).mean)  # the code `encode` gives

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The top code: the mean of q(z2|z1) at the mean of q(z1|x)."""
        return self.top_posterior(self.first_posterior(x).mean).mean

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """p(x|z1)'s mean at the mean of p(z1|z2 = z): deterministic, as serving wants a code's image."""
        return to_image(self.decoder(self.first_conditional(z).mean))

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Through the mean of q(z1|x): the layer the likelihood sees, as the ELBO's reconstruction term does."""
        return to_image(self.decoder(self.first_posterior(x).mean))

    def sample(self, n: int, y: torch.Tensor | None = None, generator=None, temperature: float = 1.0) -> torch.Tensor:
        """Ancestral samples: z2 ~ p(z2), z1 ~ p(z1|z2), each noise scaled by `temperature`; the mean of p(x|z1)."""
        device = next(self.parameters()).device
        z2 = self.prior.sample(n, generator=generator, temperature=temperature, device=device)
        p1 = self.first_conditional(z2)
        noise = torch.randn(p1.mu.shape, generator=generator, device=device)
        return to_image(self.decoder(p1.mu + temperature * torch.exp(0.5 * p1.logvar) * noise))

    def kl_per_dim(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """KL per unit of the top code, q(z2|z1) at the mean of q(z1|x) against p(z2): the units `encode` gives."""
        return self.prior.kl_per_dim(self.top_posterior(self.first_posterior(x).mean))
