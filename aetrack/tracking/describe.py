"""What a run, an experiment and a registered model say about themselves in the MLflow UI: run names that say
what the run is (`vae-normal-z8-digits`), and descriptions (MLflow's `mlflow.note.content`, shown as Markdown
above a run's or an experiment's page) written from what was trained and measured."""

from __future__ import annotations

import dataclasses

from aetrack.config import MIXTURE_PRIORS, TrainConfig
from aetrack.models import REGISTRY
from aetrack.tracking import metric_names as names
from aetrack.tracking import tags

NOTE = "mlflow.note.content"  # MLflow's own tag: the description of a run or an experiment
RUN_NAME = "mlflow.runName"

# What each option group adds to a run's name: the settings that tell two runs of one variant apart.
SCOPE_LABELS = {
    "noise": lambda c: f"{c.noise}{c.noise_level:g}",
    "sparsity": lambda c: f"{c.sparsity}{c.sparsity_weight:g}",
    "contractive": lambda c: f"w{c.contractive_weight:g}",
    "variational": lambda c: c.prior + (f"-b{c.beta:g}" if c.beta != 1 else ""),
    "semi_supervised": lambda c: f"{c.labeled}labels",
    "stacked": lambda c: "M1codes",
}
SCOPE_ORDER = tuple(SCOPE_LABELS)


# Settings of a variant's own groups that its other settings can leave idle: a mixture's components under a normal
# prior, K importance samples under the ELBO, the KL-sparsity target under L1.
IDLE_UNLESS = {
    "prior_components": lambda c: c.prior in MIXTURE_PRIORS,
    "train_samples": lambda c: c.objective != "elbo",
    "sparsity_target": lambda c: c.sparsity == "kl",
}
IDENTITY = ("model", "dataset")  # logged always: what the run is, in the runs table and on each image card
DEFAULT_PARAMS = TrainConfig().to_params()


def applies(config: TrainConfig, name: str) -> bool:
    """Whether setting `name` applies to `config.model` (an option of no group, or of one of its groups) and is not
    left idle by the config's other settings (`IDLE_UNLESS`)."""
    scope = TrainConfig.__dataclass_fields__[name].metadata["scope"]
    in_scope = scope is None or scope in REGISTRY[config.model].scopes
    return in_scope and IDLE_UNLESS.get(name, lambda c: True)(config)


def run_params(given: TrainConfig) -> dict[str, str]:
    """The params a run logs: its identity, and each setting that applies to its variant and differs from aetrack's
    default. MLflow's image cards print every param above the picture (33 of them hid it), so defaults stay out:
    `TrainConfig.from_params` fills them back, and the model's config.json holds every setting."""
    return {k: v for k, v in given.to_params().items() if k in IDENTITY or (applies(given, k) and v != DEFAULT_PARAMS[k])}


def resolved_tags(given: TrainConfig, resolved: TrainConfig) -> dict[str, str]:
    """What each `auto` setting that applies resolved to (`aetrack.resolved.epochs` where epochs = auto)."""
    return {tags.RESOLVED.format(name): str(getattr(resolved, name)) for name in ("epochs", "patience", "kl_warmup")
            if applies(given, name) and getattr(given, name) is None}


def full_params(params: dict[str, str]) -> dict[str, str]:
    """A run's params with the defaults it left out filled in, for each setting that applies to it: what readers
    (compare, studies) group and label runs by."""
    config = TrainConfig.from_params(params)
    return {**{k: v for k, v in DEFAULT_PARAMS.items() if applies(config, k)}, **params}


def base_run_name(config: TrainConfig) -> str:
    """`vae-normal-z8-digits`, `dae-gaussian0.3-z8-digits`, `ae-conv-z16-mnist-s1`: the variant, its own settings,
    the latent size, a conv net, the data set and a seed other than 0."""
    scopes = REGISTRY[config.model].scopes
    parts = [config.model, *(SCOPE_LABELS[s](config) for s in SCOPE_ORDER if s in scopes)]
    if config.arch != "mlp":
        parts.append(config.arch)
    if config.activation != "relu":
        parts.append(config.activation)
    parts += [f"z{config.latent_dim}", config.dataset]
    if config.seed:
        parts.append(f"s{config.seed}")
    return "-".join(parts)


def run_name(config: TrainConfig, client, experiment_id: str) -> str:
    """`base_run_name`, with `-2`, `-3`, ... where the experiment already holds a run of that name."""
    base = base_run_name(config)
    taken = {r.info.run_name for r in client.search_runs([experiment_id], f"attributes.run_name LIKE '{base}%'",
                                                         max_results=5000)}
    if base not in taken:
        return base
    return next(f"{base}-{n}" for n in range(2, len(taken) + 3) if f"{base}-{n}" not in taken)


def _setting(config: TrainConfig, name: str) -> str:
    value = getattr(config, name)
    return ",".join(map(str, value)) if isinstance(value, tuple) else f"{value:g}" if isinstance(value, float) else str(value)


def variant_settings(config: TrainConfig) -> str:
    """The settings of the variant's own option groups, as `prior=normal, beta=1`."""
    scopes = REGISTRY[config.model].scopes
    own = [f.name for f in dataclasses.fields(TrainConfig) if f.metadata["scope"] in scopes]
    return ", ".join(f"{name}={_setting(config, name)}" for name in own)


def run_description(config: TrainConfig, *, train_images: int, val_images: int, best_val_loss: float, best_epoch: int,
                    epochs_run: int, stopped_early: bool, registered: str | None = None,
                    ranked: tuple[str, float] | None = None) -> str:
    """The run's description (Markdown): what was trained on what, and how well."""
    variant = REGISTRY[config.model]
    own = variant_settings(config)
    network = f"{config.arch.upper() if config.arch == 'mlp' else 'conv net'} {_setting(config, 'hidden')}"
    lines = [
        f"**{config.model}**, {variant.description}" + (f"; {own}" if own else "") + ".",
        f"Latent size {config.latent_dim}, {network}, {config.likelihood} likelihood.",
        f"Data: **{config.dataset}**, {train_images} training and {val_images} validation images"
        + (f", {config.binarize} binarization" if config.binarize != "none" else "") + ".",
        f"Best validation loss **{best_val_loss:.4f}** at epoch {best_epoch} of {epochs_run}"
        + (f" (stopped early; budget {config.epochs})" if stopped_early else f" (budget {config.epochs})") + ".",
    ]
    if ranked:  # tuning reports it and the champion is chosen on it: the loss above may weigh the KL by beta
        lines.append(f"At that epoch `{ranked[0]}` **{ranked[1]:.4f}** (what ranks models for `@champion` and "
                     f"what `aetrack tune` optimises).")
    if config.model in WARMED_UP and (config.kl_warmup or 0) > 0:
        lines.append(f"KL warm-up: the KL weight rises from 0 to beta over epochs 1-{config.kl_warmup}, so `loss/train` "
                     "rises while it does (`optim/kl_scale`); early stopping waits for its end.")
    if registered:
        lines.append(f"Registered as `{registered}`.")
    return "  \n".join(lines)


WARMED_UP = tuple(name for name, variant in REGISTRY.items() if "variational" in variant.scopes)

KEY_TEST_METRICS = names.KEY_TEST_METRICS  # one list, in metric_names: registry.KEY_METRICS reads it too


def key_test_figures(metrics: dict[str, float]) -> dict[str, float]:
    """The run's key `test/*` figures (short names), from all of its metrics."""
    return {name: metrics[names.test(name)] for name in KEY_TEST_METRICS if names.test(name) in metrics}


def with_test_figures(description: str, metrics: dict[str, float]) -> str:
    """`description` with its line of test figures replaced by the current ones."""
    figures = key_test_figures(metrics)
    kept = [line for line in description.split("  \n") if not line.startswith("Test set (aetrack evaluate):")]
    if figures:
        kept.append("Test set (aetrack evaluate): " + ", ".join(f"{k} **{v:.4g}**" for k, v in figures.items()) + ".")
    return "  \n".join(kept)


CHART_SECTIONS = ("Chart sections, x axis the epoch in each but `per_step`: `loss` (train and val), `optim` (the KL "
                  "weight during warm-up, a learning rate that a schedule moves), `progress` (pictures, from epoch 0), "
                  "`result` (pictures of the kept weights, loss curves with train and val together), `system`, `val` "
                  "(the validation loss's parts); `per_step`: the training loss over the last `--log-every` optimiser "
                  "steps, x axis the optimiser step; `test`: after `aetrack evaluate`.")


def experiment_description(name: str) -> str:
    return (f"Autoencoders trained by `aetrack train --experiment {name}`; compare them with "
            f"`aetrack compare --experiment {name}` (reports go to `{name}-comparisons`, tuning trials to "
            f"`{name}-tuning`).  \n"
            "Run names: variant, its settings, latent size, data set (`vae-normal-z8-digits`). Params: the settings "
            "that differ from aetrack's defaults (every setting is in the model's config.json).  \n" + CHART_SECTIONS)


# MLflow 3.17's UI shows an experiment as GenAI or model training by its "workflow type", from the link's query or
# the browser's last choice (GenAI when new), before the experiment's kind tag: aetrack's links say it.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def ui_page(experiment_id: str, run_id: str | None = None, tab: str | None = None) -> str:
    """The UI's fragment for an experiment's runs table, a run, or a run's tab, in the model-training view:
    `#/experiments/1/runs/ID?workflowType=machine_learning`."""
    path = f"#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "") + (f"/{tab}" if tab else "")
    return f"{path}?{MODEL_TRAINING_VIEW}"


# MLflow 3 opens an experiment on the page of its kind (its own tag): GenAI's overview of traces and token costs
# unless the experiment says it holds model training, whose page is the runs table.
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def open_experiment(client, name: str, description: str | None = None) -> str:
    """The id of experiment `name` (created where missing), marked as model training and described unless someone
    already described it. MLflow's active experiment is left as it was."""
    from mlflow.exceptions import MlflowException  # here: `aetrack study --list` reads this module; MLflow is slow

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            client.create_experiment(name, tags={EXPERIMENT_KIND: MODEL_TRAINING,
                                                 NOTE: description or experiment_description(name)})
        except MlflowException:  # another process created it first
            pass
        experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise MlflowException(f"experiment {name!r} is deleted; restore it (mlflow experiments restore) or use another")
    if experiment.tags.get(EXPERIMENT_KIND) != MODEL_TRAINING:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
    if not experiment.tags.get(NOTE):
        client.set_experiment_tag(experiment.experiment_id, NOTE, description or experiment_description(name))
    return experiment.experiment_id


def registered_model_description(name: str, config: TrainConfig) -> str:
    what = REGISTRY[config.model].description
    return (f"`{config.model}`: {what}, trained by aetrack on {config.dataset}. "
            f"Serve a version with `aetrack serve models:/{name}@champion`; `aetrack promote {name} VERSION` "
            "moves the alias. Each version is tagged with its run's validation and test figures.")
