"""What a run, an experiment and a registered model say about themselves in the MLflow UI: run names that say
what the run is (`vae-normal-z8-digits`), and descriptions (MLflow's `mlflow.note.content`, shown as Markdown
above a run's or an experiment's page) written from what was trained and measured."""

from __future__ import annotations

import dataclasses

from aetrack.config import TrainConfig
from aetrack.models import REGISTRY
from aetrack.tracking import metric_names as names

NOTE = "mlflow.note.content"  # MLflow's own tag: the description of a run or an experiment
RUN_NAME = "mlflow.runName"

# What each option group adds to a run's name: the settings that tell two runs of one variant apart.
SCOPE_LABELS = {
    "noise": lambda c: f"{c.noise}{c.noise_level:g}",
    "sparsity": lambda c: f"{c.sparsity}{c.sparsity_weight:g}",
    "contractive": lambda c: f"w{c.contractive_weight:g}",
    "variational": lambda c: c.prior + (f"-b{c.beta:g}" if c.beta != 1 else ""),
    "semi_supervised": lambda c: f"{c.labeled}labels" + ("-M1codes" if c.features else ""),
}
SCOPE_ORDER = tuple(SCOPE_LABELS)


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
                    epochs_run: int, stopped_early: bool, registered: str | None = None) -> str:
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
    if registered:
        lines.append(f"Registered as `{registered}`.")
    return "  \n".join(lines)


# The test figures a description and a model version's tags show, in this order, where the run has them.
KEY_TEST_METRICS = ("recon_loss", "psnr", "nll_iw", "neg_elbo", "fcd", "label_accuracy", "error", "probe_accuracy")


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


def note_evaluation(client, run_id: str) -> None:
    """After `aetrack evaluate`: the run's description and its model versions' tags gain the key test figures."""
    run = client.get_run(run_id)
    note = with_test_figures(run.data.tags.get(NOTE, ""), run.data.metrics)
    client.set_tag(run_id, NOTE, note)
    from aetrack.tracking.registry import tag_versions_of_run

    tag_versions_of_run(client, run_id, run.data.metrics, description=note)


def experiment_description(name: str) -> str:
    return (f"Autoencoders trained by `aetrack train --experiment {name}`; compare them with "
            f"`aetrack compare --experiment {name}` (reports go to `{name}-comparisons`).  \n"
            "Run names: variant, its settings, latent size, data set (`vae-normal-z8-digits`). Chart sections: "
            "`loss` (train and val per epoch), `progress` (pictures per epoch, from 0), `result` (pictures of the "
            "kept weights), `steps` (per optimiser step), `test` (after `aetrack evaluate`), `val` (the loss's parts).")


def describe_experiment(client, experiment_id: str) -> None:
    """Give an experiment aetrack made a description, unless someone already wrote one."""
    experiment = client.get_experiment(experiment_id)
    if not experiment.tags.get(NOTE):
        client.set_experiment_tag(experiment_id, NOTE, experiment_description(experiment.name))


def registered_model_description(name: str, config: TrainConfig) -> str:
    what = REGISTRY[config.model].description
    return (f"`{config.model}`: {what}, trained by aetrack on {config.dataset}. "
            f"Serve a version with `aetrack serve models:/{name}@champion`; `aetrack promote {name} VERSION` "
            "moves the alias. Each version is tagged with its run's validation and test figures.")
