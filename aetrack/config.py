"""Every setting, written once: a training run's in TrainConfig, a tuning worker's in TuneConfig.

Click options are generated from their fields (`option()` metadata: help, choices, scope), the flat
form of a TrainConfig is what MLflow logs as params, and the same params rebuild the model for
evaluation and serving. `validate()` turns impossible values into a ConfigError; the CLI shows it
as a one-line usage error. This module imports nothing heavy: `aetrack --help` reads it.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field

from aetrack.memory import INPUT_SIZES, available_bytes, model_bytes  # noqa: F401 (INPUT_SIZES: re-exported)

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10")
BINARIZE = ("none", "static", "dynamic")
# Training-pool sizes (before the validation split): what `--epochs auto` is documented with.
POOL_SIZES = {"digits": 1437, "mnist": 60000, "fashion-mnist": 60000, "cifar10": 50000}
DEVICES = ("auto", "cpu", "cuda")
SAMPLERS = ("tpe", "random", "cmaes", "grid")
PRUNERS = ("median", "hyperband", "none")
PRECISIONS = ("fp32", "bf16", "fp16")
CONTRACTIVE_ESTIMATORS = ("exact", "hutchinson")
PRIORS = ("normal", "mog", "uniform", "vamp")  # each built by priors.build_prior
MIXTURE_PRIORS = ("mog", "vamp")  # the priors with --prior-components

# `--epochs auto`: a budget of optimiser steps, turned into epochs for the data set at hand. Small data sets need
# many passes (digits: 11 steps an epoch) and large ones few (MNIST: 422), so no fixed epoch count suits both.
AUTO_STEPS = 6000
AUTO_MIN_EPOCHS, AUTO_MAX_EPOCHS = 50, 600
AUTO = "auto"  # how a None ("resolved at training time") setting is written and read
MAX_SEED = 2**32 - 1  # NumPy and scikit-learn (PCA, t-SNE, the latent mixture) take no larger seed
MIN_VAL_EXAMPLES = 16  # the validation loss, and the pictures drawn from the validation set (8 inputs, 8 pairs)


class UserError(Exception):
    """A failure the user can fix (a missing data file, a study that cannot go on); str(err) is one line."""


class ConfigError(UserError, ValueError):
    """An impossible setting or combination of options; str(err) is one line that names the option."""


def option(default, help: str, *, choices: tuple | None = None, scope: str | None = None, envvar: str | None = None):
    """A config field with its CLI help; `scope` names the option group a variant must accept."""
    return field(default=default, metadata={"help": help, "choices": choices, "scope": scope, "envvar": envvar})


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


@dataclass(frozen=True)
class TrainConfig:
    # What to train on.
    model: str = option("vae", "Autoencoder variant.")
    dataset: str = option("digits", "Data set.", choices=DATASETS)
    binarize: str = option("none", "Bernoulli-likelihood protocol.", choices=BINARIZE)
    val_fraction: float = option(0.1, "Fraction of the training set held out for validation.")
    # Networks.
    arch: str = option("mlp", "Encoder/decoder architecture.", choices=("mlp", "conv"))
    hidden: tuple[int, ...] = option((256, 128), "Hidden sizes (MLP units or conv channels), comma separated.")
    latent_dim: int = option(8, "Size of the latent code.")
    activation: str = option("relu", "Hidden units of an MLP: ReLU, tanh (Burda et al. 2015), softplus (Kingma et al. "
                             "2014), or gated dense layers (the VampPrior paper's).", choices=("relu", "tanh", "softplus", "gated"))
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
    contractive_estimator: str = option("exact", "How the penalty's squared Jacobian norm is computed: exact, or "
                                        "hutchinson, an unbiased one-probe estimate (E ||J^T u||^2 with a Rademacher probe u: "
                                        "entries +1 or -1) at the cost of one extra backward pass.", choices=CONTRACTIVE_ESTIMATORS,
                                        scope="contractive")
    # Variational.
    prior: str = option("normal", "Prior p(z).", choices=PRIORS, scope="variational")
    prior_components: int = option(10, "Components of the mixture or VampPrior.", scope="variational")
    beta: float = option(1.0, "Weight of the KL term (beta-VAE).", scope="variational")
    kl_warmup: int | None = option(None, "Epochs over which the KL weight rises linearly from 0 to beta "
                                   "(auto: the first 10 % of --epochs; 0: off).", scope="variational")
    objective: str = option("elbo", "Training bound: the ELBO, or the importance-weighted bound of Burda et al. 2015 "
                            "with --train-samples samples (tighter; K decoder passes per example); iwae-dreg: the same "
                            "bound with the doubly reparameterised encoder gradient of Tucker et al. 2018.",
                            choices=("elbo", "iwae", "iwae-dreg"), scope="importance")
    train_samples: int = option(1, "Importance samples K per example for --objective iwae (K = 1: the ELBO).",
                                scope="importance")
    # Hierarchical (two stochastic layers, x -> z1 -> z2; --latent-dim is z2's, the code that is sampled and served).
    first_latent_dim: int = option(100, "Size of the first stochastic layer z1, between the data and the top code "
                                   "(Burda et al. 2015: 100 under a top code of 50).", scope="hierarchical")
    latent_hidden: tuple[int, ...] = option((100, 100), "Hidden sizes of the networks between z1 and the top code, "
                                            "q(z2|z1) and p(z1|z2), comma separated (--hidden: between x and z1).",
                                            scope="hierarchical")
    # Semi-supervised.
    labeled: int = option(100, "Labelled training examples (the rest are unlabelled).", scope="semi_supervised")
    classifier_weight: float = option(0.1, "Weight of the labelled classification loss: alpha = classifier_weight x "
                                      "labeled on the mean cross-entropy (Kingma et al. 2014's alpha = 0.1 N is "
                                      "0.001 x 100 labels here).", scope="semi_supervised")
    features: str = option("", "M1+M2 (Kingma et al. 2014): a trained VAE of this data set (run id or model URI) whose "
                           "latent means, on its active units, M2 models instead of the pixels; its decoder turns them "
                           "back into images.", scope="stacked")
    feature_draws: bool = option(False, "M1+M2: train M2 on codes drawn from M1's q(z|x) at every step, as Kingma et "
                                 "al. 2014 did, instead of its means; validation, evaluation and serving use the means.",
                                 scope="stacked")
    # Optimisation.
    lr: float = option(1e-3, "Adam learning rate (the peak, with a schedule).")
    lr_schedule: str = option("constant", "Learning-rate schedule over the epoch budget: cosine decays to 1 % of --lr, "
                              "step divides by 10 at 50 % and 75 %, plateau halves it when the validation loss stalls, "
                              "burda: 8 stages of 3^i epochs (of 3280, scaled to the budget) at 10^(-i/7) x --lr "
                              "(Burda et al. 2015).",
                              choices=("constant", "cosine", "step", "plateau", "burda"))
    adam_eps: float = option(1e-8, "Adam's epsilon (Burda et al. 2015 used 1e-4).")
    warmup_steps: int = option(0, "Optimiser steps over which the learning rate rises linearly from 0.")
    grad_clip: float = option(0.0, "Clip the gradient's global norm to this value (0: off).")
    decoder_bias: str = option("mean", "Initial decoder output bias: the logit of the training set's mean image, or zero.",
                               choices=("mean", "zero"))
    batch_size: int = option(128, "Mini-batch size.")
    epochs: int | None = option(None, "Maximum number of epochs (auto: a budget of optimiser steps that fits the "
                                "data set; see docs/training.md).")
    keep: str = option("best", "The weights a run keeps: its epoch of best validation loss, or its last epoch (a fixed "
                       "schedule, nothing chosen on the validation set).", choices=("best", "last"))
    patience: int | None = option(None, "Stop after this many epochs without a better validation loss "
                                  "(auto: 20 % of --epochs, at least 10; 0: never).")
    seed: int = option(0, "Random seed: the same seed gives the same run.")
    device: str = option("auto", "Where to train.", choices=DEVICES)
    log_every: int = option(20, "Log training metrics every N steps.")
    # Speed.
    precision: str = option("fp32", "Arithmetic of the forward pass: fp32, or bf16 / fp16 autocast (fp16 with a "
                            "gradient scaler); losses are summed in fp32.", choices=PRECISIONS)
    compile: bool = option(False, "Compile the model with torch.compile (the first steps pay for compiling).")

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

    def validate(self) -> TrainConfig:
        """Impossible values as a one-line ConfigError; returns the config."""
        check_finite(self)  # first: the rules below compute with the values
        rules = [
            (self.latent_dim >= 1, "--latent-dim must be at least 1"),
            (len(self.hidden) >= 1 and min(self.hidden) >= 1, "--hidden needs at least one positive size, e.g. 256,128"),
            (self.epochs is None or self.epochs >= 1, "--epochs must be auto or at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.lr > 0, "--lr must be positive"),
            (0 < self.val_fraction < 1, "--val-fraction must be between 0 and 1"),
            (not 0 < self.val_fraction < 1 or round(self.val_fraction * POOL_SIZES.get(self.dataset, 10**9)) >= MIN_VAL_EXAMPLES,
             f"--val-fraction {self.val_fraction} leaves {round(self.val_fraction * POOL_SIZES.get(self.dataset, 0))} "
             f"validation examples of {self.dataset}'s {POOL_SIZES.get(self.dataset)}; at least {MIN_VAL_EXAMPLES} are needed"),
            (0 <= self.seed <= MAX_SEED, f"--seed must be between 0 and {MAX_SEED} (2**32 - 1)"),
            (self.patience is None or self.patience >= 0, "--patience must be auto, 0 (off) or positive"),
            (self.warmup_steps >= 0 and self.grad_clip >= 0, "--warmup-steps and --grad-clip must be >= 0"),
            (self.adam_eps > 0, "--adam-eps must be positive"),
            (self.log_every >= 1, "--log-every must be at least 1"),
            (self.noise_level >= 0 and (self.noise == "gaussian" or self.noise_level <= 1),
             "--noise-level must be >= 0 (and at most 1 for masking and salt-pepper noise)"),
            (self.sparsity_weight >= 0 and 0 < self.sparsity_target < 1,
             "--sparsity-weight must be >= 0 and --sparsity-target between 0 and 1"),
            (self.contractive_weight >= 0, "--contractive-weight must be >= 0"),
            (self.beta >= 0 and (self.kl_warmup is None or self.kl_warmup >= 0), "--beta and --kl-warmup must be >= 0"),
            (self.prior_components >= 1, "--prior-components must be at least 1"),
            (self.first_latent_dim >= 1 and len(self.latent_hidden) >= 1 and min(self.latent_hidden) >= 1,
             "--first-latent-dim must be at least 1 and --latent-hidden needs a positive size, e.g. 100,100"),
            (self.train_samples >= 1, "--train-samples must be at least 1"),
            (self.objective != "elbo" or self.train_samples == 1, "--train-samples needs --objective iwae or iwae-dreg"),
            (self.labeled >= 1 and self.classifier_weight >= 0, "--labeled must be at least 1 and --classifier-weight >= 0"),
            (self.activation == "relu" or self.arch == "mlp", "--activation applies to --arch mlp (conv nets use ReLU)"),
        ]
        _check(self, rules)
        check_ranges(self, TRAIN_RANGES)
        check_memory(self)
        if self.device == "cuda":
            resolve_device(self.device)
        return self

    def to_params(self) -> dict[str, str]:
        """Flat string params, named like the CLI options (with underscores)."""
        return to_strings(self)

    @classmethod
    def from_params(cls, params: dict[str, str]) -> TrainConfig:
        """Rebuild from logged params; unknown keys (tracking options) are ignored."""
        config = from_strings(cls, params)
        legacy = config.model == "m2" and config.features  # M1+M2 as logged before it was a variant of its own (m1m2)
        return dataclasses.replace(config, model="m1m2") if legacy else config


@dataclass(frozen=True)
class TuneConfig:
    """How one tuning worker searches: everything of `aetrack tune` that is not a training setting."""

    n_trials: int | None = option(None, "Trials in total over all workers (auto: 20; grid: its size).")
    timeout: float = option(0.0, "This worker starts no trial after this many seconds (0: no limit).")
    study_name: str = option("", "Optuna study  [default: aetrack-<dataset>-<model>]")
    storage: str = option("sqlite:///optuna.db", "SQLAlchemy URL of the study's database; postgresql://user:pass@host/db "
                          "for many machines.", envvar="AETRACK_OPTUNA_STORAGE")
    sampler: str = option("tpe", "Optuna sampler.", choices=SAMPLERS)
    sampler_seed: int | None = option(None, "Seed of the sampler (auto: unseeded; give each worker its own).")
    pruner: str = option("median", "Optuna pruner.", choices=PRUNERS)
    pruner_startup_trials: int = option(5, "Median pruner: trials completed before it prunes.")
    pruner_warmup_epochs: int = option(1, "Median pruner: epochs a trial runs before it can be pruned.")
    metric: str = option("", "Validation metric to optimise  [default: val_error for m2, val_neg_elbo for VAEs, "
                         "else val_recon_loss]")
    direction: str = option("minimize", "Whether a lower or a higher metric is better.", choices=("minimize", "maximize"))
    heartbeat: int = option(10, "Seconds between a running trial's heartbeats.")
    grace_period: int | None = option(None, "Seconds without heartbeat before a trial counts as dead (auto: 2 x heartbeat).")
    max_retry: int = option(3, "Retries of a dead worker's trial.")
    threads: int = option(0, "Torch CPU threads of this worker (0: this machine's cores shared among its workers that are running a trial, set anew for each trial).")

    def validate(self) -> TuneConfig:
        check_finite(self)
        _check(self, [
            ((self.n_trials is None or self.n_trials >= 1) and self.heartbeat >= 1 and self.max_retry >= 0,
             "--n-trials and --heartbeat must be at least 1, --max-retry at least 0"),
            (self.grace_period is None or self.grace_period > self.heartbeat,
             "--grace-period must be longer than --heartbeat, or live trials count as dead"),
        ])
        check_ranges(self, TUNE_RANGES)
        return self

    @property
    def stale_after(self) -> int:
        return self.grace_period or 2 * self.heartbeat


@dataclass(frozen=True)
class TrackingOptions:
    """Where and how a training run is tracked (the tracking URI is set by the caller, once)."""

    experiment: str = option("aetrack", "MLflow experiment name.")
    run_name: str | None = option(None, "MLflow run name.")
    register: bool = option(True, "Register generative models (tune: the best trials') and crown the champion.")
    registered_model: str | None = option(None, "Registry name (default aetrack-<dataset>-<model>).")
    checkpoint_dir: str = option("checkpoints", "Where a run's checkpoint goes (<dir>/<run id>/last.pt): the first "
                                 "epoch, then one every few seconds, and the last at the end or on a signal; removed "
                                 "when it finishes.")


# Evaluation: the noise levels of a denoising autoencoder's PSNR table.
DEFAULT_NOISE_LEVELS = (0.1, 0.2, 0.3, 0.5, 0.7)


# Every numeric setting's range, inclusive: a value outside it (or nan, or inf) is a usage error before any work.
# The upper bounds are far beyond any useful run, and small enough that nothing downstream overflows or never ends
# (an epoch count of 1e23 left `--kl-warmup auto` at 1e22 epochs: a KL weight of 0 forever).
TRAIN_RANGES = {
    "val_fraction": (0.0, 1.0), "hidden": (1, 2**16), "latent_dim": (1, 2**16), "noise_level": (0.0, 100.0),
    "sparsity_weight": (0.0, 1e6), "sparsity_target": (0.0, 1.0), "contractive_weight": (0.0, 1e6),
    "prior_components": (1, 10_000), "first_latent_dim": (1, 2**16), "latent_hidden": (1, 2**16), "beta": (0.0, 1e6), "kl_warmup": (0, 100_000), "train_samples": (1, 10_000),
    "labeled": (1, 10**7), "classifier_weight": (0.0, 1e6), "lr": (0.0, 10.0), "adam_eps": (0.0, 1.0),
    "warmup_steps": (0, 10**9), "grad_clip": (0.0, 1e9), "batch_size": (1, 2**16), "epochs": (1, 100_000),
    "patience": (0, 100_000), "seed": (0, MAX_SEED), "log_every": (1, 10**9),
}
TUNE_RANGES = {
    "n_trials": (1, 10**6), "timeout": (0.0, 1e8), "sampler_seed": (0, MAX_SEED), "pruner_startup_trials": (0, 10**6),
    "pruner_warmup_epochs": (0, 100_000), "heartbeat": (1, 86_400), "grace_period": (1, 10 * 86_400),
    "max_retry": (0, 1000), "threads": (0, 4096),
}
MEMORY_SHARE = 0.8  # of the memory available now, at most, for what training holds (`model_bytes`)


def numeric_fields(cls) -> list[str]:
    """The fields of `cls` that hold numbers (int, float, `int | None`, a tuple of ints); bools are switches."""
    found = []
    for name, hint in hints(cls).items():
        inner = optional_type(hint) or (typing.get_args(hint)[0] if typing.get_origin(hint) is tuple else hint)
        if inner in (int, float):
            found.append(name)
    return found


def numbers(value) -> tuple:
    return value if isinstance(value, tuple) else () if value is None else (value,)


def check_finite(config) -> None:
    """No nan or inf in any numeric setting: a one-line ConfigError naming the option."""
    for name in numeric_fields(type(config)):
        for number in numbers(getattr(config, name)):
            if not math.isfinite(number):
                raise ConfigError(f"{option_name(name)}: {number} is not a finite number")


def check_ranges(config, ranges: dict[str, tuple]) -> None:
    """Each numeric setting within its range (after the rules, whose messages say more), else a one-line ConfigError."""
    for name, (low, high) in ranges.items():
        value = getattr(config, name)
        for number in numbers(value):
            if not low <= number <= high:
                raise ConfigError(f"{option_name(name)} {format_value(value)}: out of range (from {low} to {high})")


def check_memory(config: TrainConfig) -> None:
    needed, available = model_bytes(config), available_bytes()
    if available is not None and needed > MEMORY_SHARE * available:
        raise ConfigError(f"--hidden {format_value(config.hidden)} --latent-dim {config.latent_dim} "
                          f"--batch-size {config.batch_size}: training needs about {needed / 2**30:.1f} GiB, more than "
                          f"this machine has available ({available / 2**30:.1f} GiB); choose smaller sizes")


def _check(config, rules) -> None:
    for ok, message in rules:
        if not ok:
            raise ConfigError(message)
    for f in dataclasses.fields(config):
        choices = f.metadata["choices"]
        if choices and getattr(config, f.name) not in choices:
            raise ConfigError(f"{option_name(f.name)}: {getattr(config, f.name)!r} is not one of {', '.join(choices)}")


def resolve_device(name: str):
    """The torch device `--device` names; `cuda` where none is available is a ConfigError."""
    if name == "cpu":
        return _torch().device("cpu")
    torch = _torch()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here (use --device auto or cpu)")
    return torch.device(name)


def _torch():
    import torch

    return torch


# ----- values as strings: CLI options, --set, MLflow params -------------------------------------

def hints(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def optional_type(hint):
    """int for `int | None`, else None."""
    args = typing.get_args(hint)
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return None


def format_value(value) -> str:
    if value is None:
        return AUTO
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def parse_value(hint, text):
    if not isinstance(text, str):
        return text
    if optional_type(hint):
        return None if text.strip().lower() == AUTO else parse_value(optional_type(hint), text)
    if hint is bool:
        return text.lower() in ("1", "true", "yes")
    if typing.get_origin(hint) is tuple:
        return tuple(typing.get_args(hint)[0](part) for part in text.split(",") if part.strip())
    return hint(text)


def to_strings(config) -> dict[str, str]:
    return {f.name: format_value(getattr(config, f.name)) for f in dataclasses.fields(config)}


def from_strings(cls, values: dict[str, str]):
    """A config from strings (options, --set, logged params); unknown keys are ignored, unreadable values are
    a ConfigError."""
    types = hints(cls)
    fields = {}
    for name, text in values.items():
        if name not in types:
            continue
        try:
            fields[name] = parse_value(types[name], text)
        except ValueError:
            raise ConfigError(f"{option_name(name)}: cannot read {text!r} as {types[name]}") from None
    return cls(**fields)


def parse_settings(items: tuple[str, ...], cls=TrainConfig) -> dict[str, str]:
    """`--set latent_dim=4,prior=mog,hidden=64,32` (repeatable): any field by name, for MLproject's string params.

    A piece without `=` continues the previous value (hidden's sizes); an empty value keeps the default."""
    known = {f.name for f in dataclasses.fields(cls)}
    settings: dict[str, str] = {}
    key = None
    for item in items:
        for piece in (part.strip() for part in item.split(",")):
            name, sep, value = piece.partition("=")
            if not sep and key is not None and piece:
                settings[key] += "," + piece
                continue
            if not piece:
                continue
            key = name.strip().replace("-", "_")
            if not sep or key not in known:
                raise ConfigError(f"--set expects NAME=VALUE with NAME a training option, got {piece!r}")
            settings[key] = value.strip()
    return {k: v for k, v in settings.items() if v != ""}


def field_scope(name: str) -> str | None:
    found = TrainConfig.__dataclass_fields__.get(name)
    return found.metadata["scope"] if found else None
