"""M1+M2 (Kingma et al. 2014): M2 trained on the codes of a VAE trained before it.

`--model m2 --features RUN_ID_OR_MODEL_URI`. M1, the logged VAE, is frozen inside the stacked model: its posterior
means on its active units are what M2 models and classifies, and its decoder turns the codes M2 generates back into
images. The stack therefore takes images and gives images, labels and codes like every other model: it is trained,
checkpointed, evaluated, logged and served the same way, and its `test_error` is the stacked classifier's.

What M2 fits is a density over M1's codes, not over pixels: a Gaussian with one learned scale per unit. Only M1's
active units are kept (Burda et al. 2015: Cov_x E_q[z_u] > 0.01); an inactive unit's mean is the same for every image
and would give that density a spike, not information.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from aetrack.config import ConfigError, TrainConfig
from aetrack.models import Output
from aetrack.models.variational import M2, labels_for

ACTIVE = 0.01  # the variance over images of a unit's posterior mean above which it counts as active


class CodeLikelihood(nn.Module):
    """-log N(c; mu, diag(sigma^2)) per example, with one learned log sigma per unit: M2's decoder gives the mean."""

    def __init__(self, dim: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(dim))

    def forward(self, mean: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(mean.dtype, torch.float32)  # summed in fp32 under autocast, as the pixel ones
        mean, codes, log_scale = mean.flatten(1).to(dtype), codes.flatten(1).to(dtype), self.log_scale.to(dtype)
        scaled = (codes - mean) * torch.exp(-log_scale)
        return (0.5 * scaled.square() + log_scale).sum(-1) + 0.5 * math.log(2 * math.pi) * codes.shape[-1]


class StackedM2(nn.Module):
    """M2 over the codes of a frozen VAE (M1); inputs and outputs are images."""

    def __init__(self, config: TrainConfig, shape, num_classes: int, m1: nn.Module, units: torch.Tensor,
                 fill: torch.Tensor, m1_meta: dict):
        super().__init__()
        self.config, self.num_classes, self.shape = config, num_classes, tuple(shape)
        self.m1 = m1.requires_grad_(False).eval()
        self.m1_meta = m1_meta                      # what rebuilds M1 from a model folder (modelio)
        self.register_buffer("units", units.long().clone())
        self.register_buffer("fill", fill.float().clone())  # M1's mean code: the value of its inactive units
        self.m2 = M2(config, (1, 1, len(units)), num_classes, CodeLikelihood(len(units)))

    def train(self, mode: bool = True):
        super().train(mode)
        self.m1.eval()  # M1 stays as it was trained
        return self

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """M1's posterior means on its active units, (B, 1, 1, units): M2's input. Gradients flow to x, never to M1.
        In training with --feature-draws, draws from M1's posterior instead (Kingma et al. 2014)."""
        if self.training and self.config.feature_draws:
            z = self.m1.body.posterior(x).rsample()
        else:
            z = self.m1.encode(x)
        return z[:, self.units].reshape(len(x), 1, 1, -1)

    def images(self, codes: torch.Tensor) -> torch.Tensor:
        """M1's decoding of codes on its active units (its inactive ones at their mean)."""
        full = self.fill.expand(len(codes), -1).clone()
        full[:, self.units] = codes.reshape(len(codes), -1).to(full.dtype)
        return self.m1.decode(full)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, kl_scale: float = 1.0) -> Output:
        out = self.m2(self.codes(x), y, kl_scale)
        # Training reads the loss and its parts only; the image reconstruction costs an M1 decoder pass, so it is
        # made in evaluation mode alone.
        recon = None if self.training else self.images(out.recon)
        return Output(out.loss, out.parts, recon, out.z)

    def training_batches(self, data, seed: int):
        return self.m2.training_batches(data, seed)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.m2.classify(self.codes(x))

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.m2.encode(self.codes(x), y)

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.images(self.m2.body.decoder(z, self.m2.cond(labels_for(y, z, self.num_classes))))

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        codes = self.codes(x)
        y = self.m2.classify(codes) if y is None else y
        return self.decode(self.m2.encode(codes, y), y)

    def sample(self, n: int, y: torch.Tensor | None = None, generator=None, temperature: float = 1.0) -> torch.Tensor:
        z = self.m2.body.sample_latent(n, generator, temperature)
        return self.decode(z, labels_for(y, z, self.num_classes, generator))

    def log_weights(self, x: torch.Tensor, y: torch.Tensor | None, samples: int) -> torch.Tensor:
        """(k, B) importance log-weights of log p(c, y), c: M1's code of x (y predicted when not given)."""
        return self.m2.log_weights(self.codes(x), y, samples)

    def kl_per_dim(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.m2.kl_per_dim(self.codes(x), y)


def build(config: TrainConfig, shape, num_classes: int, *, data=None, saved: dict | None = None,
          m1: tuple[nn.Module, dict] | None = None) -> StackedM2:
    """The stack for `config.features`: from a model folder's `saved` meta (weights to be loaded), or around `m1`, the
    logged VAE and its folder's meta (aetrack.tracking.artifacts.load_m1), with its active units measured on `data`."""
    from aetrack.models import build_model

    if saved is not None:
        m1_model = build_model(TrainConfig.from_params(saved["params"]), tuple(saved["shape"]), len(saved["classes"]))
        units = torch.tensor(saved["units"])
        return StackedM2(config, shape, num_classes, m1_model, units, torch.zeros(m1_model.config.latent_dim), saved)
    if m1 is None:
        raise ConfigError(f"--features {config.features}: M1 was not loaded (aetrack.tracking.artifacts.load_m1)")
    return stack(config, shape, num_classes, copy.deepcopy(m1[0]), m1[1], data)


def stack(config: TrainConfig, shape, num_classes: int, m1: nn.Module, meta: dict, data) -> StackedM2:
    """M2 on `m1`'s codes (meta: its model folder's), keeping the units that are active on `data`'s training images."""
    m1_config = TrainConfig.from_params(meta["params"])
    if m1_config.model != "vae":
        raise ConfigError(f"--features {config.features}: M1 must be a VAE (--model vae); that run trained {m1_config.model}")
    if m1_config.dataset != config.dataset or tuple(meta["shape"]) != tuple(shape):
        raise ConfigError(f"--features {config.features}: M1 was trained on {m1_config.dataset}, this run is on {config.dataset}")
    if data is None:
        raise ConfigError("--features: M1's active units are measured on the training images; none were given")
    device = data.train_images.device
    m1 = m1.to(device).eval()
    generator = torch.Generator(device).manual_seed(config.seed)
    with torch.no_grad():
        codes = torch.cat([m1.encode(data.train_batch(part, generator)[0])
                           for part in torch.arange(len(data.train_y), device=device).split(2000)])
    units = torch.nonzero(codes.var(0) > ACTIVE).flatten()
    if len(units) == 0:
        raise ConfigError(f"--features {config.features}: M1 has no active unit (no code varies with the image)")
    return StackedM2(config, shape, num_classes, m1, units.cpu(), codes.mean(0).cpu(), {**meta, "units": units.tolist()})
