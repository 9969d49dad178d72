"""Samplers that live apart from models: ex-post density estimation for autoencoders.

A plain autoencoder has no prior; a Gaussian mixture fitted to its training codes
(Ghosh et al. 2020, "From variational to deterministic autoencoders") lets it generate,
so that AE and VAE samples can be compared on equal terms. The fitted mixture is kept
as plain tensors, saved beside the weights.
"""

from __future__ import annotations

import torch


class LatentMixture:
    def __init__(self, weights: torch.Tensor, means: torch.Tensor, scale_trils: torch.Tensor):
        self.weights, self.means, self.scale_trils = weights, means, scale_trils

    @classmethod
    def fit(cls, codes: torch.Tensor, components: int = 10, seed: int = 0) -> LatentMixture:
        from sklearn.mixture import GaussianMixture

        codes = codes.detach().double().cpu().numpy()
        components = max(1, min(components, len(codes) // 2))
        gmm = GaussianMixture(components, covariance_type="full", reg_covar=1e-4, random_state=seed).fit(codes)
        covariances = torch.as_tensor(gmm.covariances_, dtype=torch.float64)
        return cls(torch.as_tensor(gmm.weights_, dtype=torch.float32), torch.as_tensor(gmm.means_, dtype=torch.float32),
                   torch.linalg.cholesky(covariances).float())

    def state(self) -> dict[str, torch.Tensor]:
        return {"sampler.weights": self.weights, "sampler.means": self.means, "sampler.scale_trils": self.scale_trils}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> LatentMixture | None:
        if "sampler.weights" not in state:
            return None
        return cls(state["sampler.weights"], state["sampler.means"], state["sampler.scale_trils"])

    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0, device=None) -> torch.Tensor:
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.means.shape[1], generator=generator)
        z = self.means[component] + temperature * (self.scale_trils[component] @ noise.unsqueeze(-1)).squeeze(-1)
        return z.to(device) if device is not None else z


@torch.no_grad()
def encode_all(model, x: torch.Tensor, y: torch.Tensor | None = None, batch_size: int = 1024) -> torch.Tensor:
    """Latent codes (posterior means) of a whole split, in batches."""
    chunks = []
    for start in range(0, len(x), batch_size):
        yb = None if y is None else y[start:start + batch_size]
        chunks.append(model.encode(x[start:start + batch_size], yb))
    return torch.cat(chunks)


def fit_sampler(model, train_x: torch.Tensor, seed: int = 0, components: int = 10) -> LatentMixture:
    """The latent mixture of a trained autoencoder (after `training.fit`, or loaded): what it generates from."""
    model.eval()
    return LatentMixture.fit(encode_all(model, train_x), components=components, seed=seed)


def generate(model, n: int, labels: torch.Tensor | None = None, generator: torch.Generator | None = None,
             temperature: float = 1.0, sampler: LatentMixture | None = None) -> torch.Tensor:
    """n images: from an autoencoder's fitted latent `sampler` when given, else from the model's prior."""
    if sampler is None:
        return model.sample(n, labels, generator=generator, temperature=temperature)
    device = next(model.parameters()).device
    return model.decode(sampler.sample(n, generator, temperature, device=device))
