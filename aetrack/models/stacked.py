"""M1+M2 (Kingma et al. 2014): M2 trained on the codes of a VAE trained before it.

`--model m1m2 --features RUN_ID_OR_MODEL_URI`. M1, the logged VAE, is frozen inside the stacked model: its posterior
means on its active units are what M2 models and classifies, and its decoder turns the codes M2 generates back into
images. The stack therefore takes images and gives images, labels and codes like every other model: it is trained,
checkpointed, evaluated, logged and served the same way, and its `test_error` is the stacked classifier's.

M1 is loaded once, when the stack is built (`load`, given by aetrack.tracking), and saved with it: its weights in the
state dict, what rebuilds its network in the model folder (`built_on`).

What M2 fits is a density over M1's codes, not over pixels: a Gaussian with one learned scale per unit. Only M1's
active units are kept (Burda et al. 2015: Cov_x E_q[z_u] > 0.01); an inactive unit's mean is the same for every image
and would give that density a spike, not information.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from aetrack.config import ConfigError, TrainConfig, UserError
from aetrack.models import Output, build_model, register
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


@register("m1m2", scopes=("variational", "importance", "semi_supervised", "stacked"), generative=True, conditional=True,
          semi_supervised=True, classifies=True, stacked=True,
          description="M1+M2 (Kingma et al. 2014): M2 on the codes of a trained VAE (--features)")
class StackedM2(nn.Module):
    """M2 over the codes of a frozen VAE (M1); inputs and outputs are images.

    Built around the logged VAE `config.features` names, read with `load` (target -> (module, its model folder's
    meta)), with its active units measured on `data`'s training images; or, loading a model folder, from the
    `saved` meta that `built_on()` wrote (the weights then come from the state dict)."""

    # What evaluation's bounds are on (aetrack.evaluation.evaluate): M2's density is over M1's codes c of x, not pixels.
    bound_notes = {"neg_elbo": "bound U(c) on -log p(c), c: M1's code of x, label summed out under q(y|c)",
                   "nll_iw": "-log p(c), c: M1's code of x, label summed out"}

    def __init__(self, config: TrainConfig, shape, num_classes: int, *, data=None,
                 load: Callable[[str], tuple[nn.Module, dict]] | None = None, saved: dict | None = None):
        super().__init__()
        if not config.features:
            raise ConfigError("--model m1m2 needs --features RUN_ID_OR_MODEL_URI: the trained VAE (M1) it is built on")
        if config.arch != "mlp":
            raise ConfigError("--features: M2 on a VAE's codes is an MLP; drop --arch conv")
        if saved is not None:
            m1 = build_model(TrainConfig.from_params(saved["params"]), tuple(saved["shape"]), len(saved["classes"]))
            units, fill, meta = torch.tensor(saved["units"]), torch.zeros(m1.config.latent_dim), saved
        else:
            m1, meta = load_m1(config, shape, load)
            units, fill = active_units(config, m1, data)
            meta = {**meta, "units": units.tolist()}
        self.config, self.num_classes, self.shape = config, num_classes, tuple(shape)
        self.m1 = m1.requires_grad_(False).eval()
        self.m1_meta = meta                         # what rebuilds M1 from a model folder (`built_on`)
        self.register_buffer("units", units.long().clone())
        self.register_buffer("fill", fill.float().clone())  # M1's mean code: the value of its inactive units
        self.m2 = M2(config, (1, 1, len(units)), num_classes, CodeLikelihood(len(units)))

    def built_on(self) -> dict:
        """What rebuilds M1's network from a model folder (aetrack.modelio); its weights are in the state dict."""
        return self.m1_meta

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


def load_m1(config: TrainConfig, shape, load) -> tuple[nn.Module, dict]:
    """M1, the logged VAE `config.features` names, and its model folder's meta; a wrong one is a ConfigError."""
    if load is None:
        raise ConfigError(f"--features {config.features}: M1 is a logged model and nothing was given to load it "
                          "(aetrack.tracking.run.build gives aetrack.tracking.artifacts.load_model)")
    try:
        m1, meta = load(config.features)
    except UserError as err:
        raise ConfigError(f"--features {config.features}: {err}") from None
    m1_config = TrainConfig.from_params(meta["params"])
    if m1_config.model != "vae":
        raise ConfigError(f"--features {config.features}: M1 must be a VAE (--model vae); that run trained {m1_config.model}")
    if m1_config.dataset != config.dataset or tuple(meta["shape"]) != tuple(shape):
        raise ConfigError(f"--features {config.features}: M1 was trained on {m1_config.dataset}, this run is on {config.dataset}")
    return m1, meta


def active_units(config: TrainConfig, m1: nn.Module, data) -> tuple[torch.Tensor, torch.Tensor]:
    """The units of M1 whose posterior mean varies over `data`'s training images, and M1's mean code."""
    if data is None:
        raise ConfigError("--features: M1's active units are measured on the training images; none were given")
    device = data.train_images.device
    m1.to(device).eval()
    generator = torch.Generator(device).manual_seed(config.seed)
    with torch.no_grad():
        codes = torch.cat([m1.encode(data.train_batch(part, generator)[0])
                           for part in torch.arange(len(data.train_y), device=device).split(2000)])
    units = torch.nonzero(codes.var(0) > ACTIVE).flatten()
    if len(units) == 0:
        raise ConfigError(f"--features {config.features}: M1 has no active unit (no code varies with the image)")
    return units.cpu(), codes.mean(0).cpu()
