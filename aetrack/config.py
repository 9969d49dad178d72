"""One frozen dataclass holds every setting of a training run.

Click options are generated from its fields, its flat form is what MLflow logs
as params, and the same params rebuild the model for evaluation and serving.
Every setting is written once, here.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field


# `--epochs auto`: a budget of optimiser steps, turned into epochs for the data set at hand. Small data sets need
# many passes (digits: 11 steps an epoch) and large ones few (MNIST: 422), so no fixed epoch count suits both.
AUTO_STEPS = 6000
AUTO_MIN_EPOCHS, AUTO_MAX_EPOCHS = 50, 600


def option(default, help: str, *, choices: tuple | None = None, scope: str | None = None):
    """A config field with its CLI help; `scope` names the option group a variant must accept."""
    return field(default=default, metadata={"help": help, "choices": choices, "scope": scope})


@dataclass(frozen=True)
class TrainConfig:
    # What to train on.
    model: str = option("vae", "Autoencoder variant.")
    dataset: str = option("digits", "Data set.", choices=("digits", "mnist", "fashion-mnist", "cifar10"))
    binarize: str = option("none", "Bernoulli-likelihood protocol.", choices=("none", "static", "dynamic"))
    val_fraction: float = option(0.1, "Fraction of the training set held out for validation.")
    # Networks.
    arch: str = option("mlp", "Encoder/decoder architecture.", choices=("mlp", "conv"))
    hidden: tuple[int, ...] = option((256, 128), "Hidden sizes (MLP units or conv channels), comma separated.")
    latent_dim: int = option(8, "Size of the latent code.")
    likelihood: str = option("bernoulli", "Reconstruction likelihood: BCE or MSE.", choices=("bernoulli", "gaussian"))
    # Denoising.
    noise: str = option("gaussian", "Input corruption.", choices=("gaussian", "masking", "salt-pepper"), scope="noise")
    noise_level: float = option(0.3, "Noise std, or fraction of pixels masked/flipped.", scope="noise")
    # Sparse.
    sparsity: str = option("l1", "Sparsity penalty on the code.", choices=("l1", "kl"), scope="sparsity")
    sparsity_weight: float = option(1e-3, "Weight of the sparsity penalty.", scope="sparsity")
    sparsity_target: float = option(0.05, "Target mean activation (KL form).", scope="sparsity")
    # Contractive.
    contractive_weight: float = option(1e-2, "Weight of the encoder-Jacobian penalty.", scope="contractive")
    # Variational.
    prior: str = option("normal", "Prior p(z).", choices=("normal", "mog", "uniform", "vamp"), scope="variational")
    prior_components: int = option(10, "Components of the mixture or VampPrior.", scope="variational")
    beta: float = option(1.0, "Weight of the KL term (beta-VAE).", scope="variational")
    kl_warmup: int | None = option(None, "Epochs over which the KL weight rises linearly from 0 to beta "
                                   "(auto: the first 10 % of --epochs; 0: off).", scope="variational")
    # Semi-supervised.
    labeled: int = option(100, "Labelled training examples (the rest are unlabelled).", scope="semi_supervised")
    classifier_weight: float = option(0.1, "alpha of Kingma et al. 2014: weight of the labelled classification loss, times N.", scope="semi_supervised")
    # Optimisation.
    lr: float = option(1e-3, "Adam learning rate (the peak, with a schedule).")
    lr_schedule: str = option("constant", "Learning-rate schedule over the epoch budget: cosine decays to 1 % of --lr, "
                              "step divides by 10 at 50 % and 75 %, plateau halves it when the validation loss stalls.",
                              choices=("constant", "cosine", "step", "plateau"))
    warmup_steps: int = option(0, "Optimiser steps over which the learning rate rises linearly from 0.")
    grad_clip: float = option(0.0, "Clip the gradient's global norm to this value (0: off).")
    decoder_bias: str = option("mean", "Initial decoder output bias: the logit of the training set's mean image, or zero.",
                               choices=("mean", "zero"))
    batch_size: int = option(128, "Mini-batch size.")
    epochs: int | None = option(None, "Maximum number of epochs (auto: a budget of optimiser steps that fits the "
                                "data set; see README).")
    patience: int | None = option(None, "Stop after this many epochs without a better validation loss "
                                  "(auto: 20 % of --epochs, at least 10; 0: never).")
    seed: int = option(0, "Random seed: the same seed gives the same run.")
    device: str = option("auto", "Where to train.", choices=("auto", "cpu", "cuda"))
    log_every: int = option(20, "Log training metrics every N steps.")

    def steps_per_epoch(self, n_train: int) -> int:
        return math.ceil(n_train / self.batch_size)

    def resolve(self, n_train: int) -> TrainConfig:
        """This config with every `auto` setting made concrete for a training set of `n_train` examples."""
        epochs = self.epochs
        if epochs is None:
            epochs = min(max(math.ceil(AUTO_STEPS / self.steps_per_epoch(n_train)), AUTO_MIN_EPOCHS), AUTO_MAX_EPOCHS)
        patience = self.patience if self.patience is not None else max(10, epochs // 5)
        kl_warmup = self.kl_warmup if self.kl_warmup is not None else round(0.1 * epochs)
        return dataclasses.replace(self, epochs=epochs, patience=patience, kl_warmup=kl_warmup)

    def to_params(self) -> dict[str, str]:
        """Flat string params, named like the CLI options (with underscores)."""
        return {f.name: _format(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_params(cls, params: dict[str, str]) -> TrainConfig:
        """Rebuild from logged params; unknown keys (tracking options) are ignored."""
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: _parse(hints[k], v) for k, v in params.items() if k in known})


AUTO = "auto"  # how a None ("resolved at training time") setting is written and read


def _optional(hint):
    """int for `int | None`, else None."""
    args = typing.get_args(hint)
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return None


def scoped_fields(scope: str | None = None) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata["scope"] == scope]


def _format(value) -> str:
    if value is None:
        return AUTO
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _parse(hint, text):
    if not isinstance(text, str):
        return text
    if _optional(hint):
        return None if text.strip().lower() == AUTO else _parse(_optional(hint), text)
    if hint is bool:
        return text.lower() in ("1", "true", "yes")
    if typing.get_origin(hint) is tuple:
        return tuple(int(part) for part in text.split(",") if part.strip())
    return hint(text)
