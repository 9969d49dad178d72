"""The `aetrack` command line. Training options are generated from TrainConfig's fields."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
from pathlib import Path
import typing

import click

from aetrack.cliutils import apply, data_options, friendly_errors, tracking_options, tracking_uri_option  # noqa: F401 (re-exported)
from aetrack.config import TrainConfig, _format, _optional, _parse
from aetrack.models import REGISTRY

HINTS = typing.get_type_hints(TrainConfig)


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def auto_epochs_help() -> str:
    """What `--epochs auto` resolves to on each data set, at the default batch size and validation fraction."""
    from aetrack.config import AUTO_STEPS
    from aetrack.data import POOL_SIZES

    default = TrainConfig()
    budgets = [f"{name} {default.resolve(round(size * (1 - default.val_fraction))).epochs}"
               for name, size in POOL_SIZES.items()]
    return (f" auto = about {AUTO_STEPS} optimiser steps, as epochs at batch {default.batch_size}: "
            + ", ".join(budgets) + ".")


def config_options(func):
    """One click option per TrainConfig field, with its default and help."""
    for f in reversed(dataclasses.fields(TrainConfig)):
        hint, meta = HINTS[f.name], f.metadata
        extra = auto_epochs_help() if f.name == "epochs" else ""
        if f.name == "model":
            kind = click.Choice(sorted(REGISTRY))
        elif meta["choices"]:
            kind = click.Choice(meta["choices"])
        elif typing.get_origin(hint) is tuple or _optional(hint):
            kind = str
        else:
            kind = hint
        scope = f" [{meta['scope'].replace('_', '-')}]" if meta["scope"] else ""
        func = click.option(option_name(f.name), f.name, type=kind, default=_format(f.default) if kind is str else f.default,
                            metavar="auto|N" if _optional(hint) else None, show_default=True,
                            help=meta["help"] + extra + scope)(func)
    return func


def parse_settings(items: tuple[str, ...]) -> dict[str, str]:
    """`--set latent_dim=4,prior=mog` (repeatable): any config field by name, for MLproject's single-string params."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = {}
    for item in items:
        for pair in filter(None, (part.strip() for part in item.split(","))):
            key, sep, value = pair.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in known:
                raise click.UsageError(f"--set expects NAME=VALUE with NAME a training option, got {pair!r}")
            settings[key] = value.strip()
    return settings


def config_from_options(ctx: click.Context, values: dict, settings: dict[str, str] | None = None) -> TrainConfig:
    """Build the config; options that do not apply to the model, or impossible values, are usage errors."""
    settings = settings or {}
    values = {**values, **settings}
    if values["model"] not in REGISTRY:
        raise click.UsageError(f"unknown model {values['model']!r}; choose from {', '.join(sorted(REGISTRY))}")
    variant = REGISTRY[values["model"]]
    for f in dataclasses.fields(TrainConfig):
        scope = f.metadata["scope"]
        explicit = f.name in settings or ctx.get_parameter_source(f.name) not in (click.core.ParameterSource.DEFAULT, None)
        if scope and explicit and scope not in variant.scopes:
            users = sorted(name for name, v in REGISTRY.items() if scope in v.scopes)
            raise click.UsageError(f"{option_name(f.name)} does not apply to --model {variant.name} "
                                   f"(it applies to {', '.join(users)})")
    fields = {}
    for f in dataclasses.fields(TrainConfig):
        choices = f.metadata["choices"]
        try:
            fields[f.name] = _parse(HINTS[f.name], values[f.name])
        except ValueError:
            raise click.UsageError(f"{option_name(f.name)}: cannot read {values[f.name]!r} as {HINTS[f.name]}") from None
        if choices and fields[f.name] not in choices:
            raise click.UsageError(f"{option_name(f.name)}: {fields[f.name]!r} is not one of {', '.join(choices)}")
    config = TrainConfig(**fields)
    check(config)
    return config


def check(config: TrainConfig) -> None:
    """Impossible values, as one-line usage errors."""
    rules = [
        (config.latent_dim >= 1, "--latent-dim must be at least 1"),
        (len(config.hidden) >= 1 and min(config.hidden) >= 1, "--hidden needs at least one positive size, e.g. 256,128"),
        (config.epochs is None or config.epochs >= 1, "--epochs must be auto or at least 1"),
        (config.batch_size >= 1, "--batch-size must be at least 1"),
        (config.lr > 0, "--lr must be positive"),
        (0 < config.val_fraction < 1, "--val-fraction must be between 0 and 1"),
        (config.patience is None or config.patience >= 0, "--patience must be auto, 0 (off) or positive"),
        (config.warmup_steps >= 0 and config.grad_clip >= 0, "--warmup-steps and --grad-clip must be >= 0"),
        (config.log_every >= 1, "--log-every must be at least 1"),
        (config.noise_level >= 0 and (config.noise == "gaussian" or config.noise_level <= 1),
         "--noise-level must be >= 0 (and at most 1 for masking and salt-pepper noise)"),
        (config.sparsity_weight >= 0 and 0 < config.sparsity_target < 1,
         "--sparsity-weight must be >= 0 and --sparsity-target between 0 and 1"),
        (config.contractive_weight >= 0, "--contractive-weight must be >= 0"),
        (config.beta >= 0 and (config.kl_warmup is None or config.kl_warmup >= 0), "--beta and --kl-warmup must be >= 0"),
        (config.prior_components >= 1, "--prior-components must be at least 1"),
        (config.labeled >= 1 and config.classifier_weight >= 0, "--labeled must be at least 1 and --classifier-weight >= 0"),
    ]
    for ok, message in rules:
        if not ok:
            raise click.UsageError(message)
    if config.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise click.UsageError("--device cuda: no CUDA device is available here (use --device auto or cpu)")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="aetrack")
def main():
    """aetrack: train, compare, tune and serve autoencoders, tracked in MLflow."""
    # MLflow's INFO lines and artifact progress bars would bury aetrack's own output.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"])


@main.command()
@config_options
@apply(data_options)
@apply(tracking_options)
@click.option("--register/--no-register", default=True, show_default=True, help="Register generative models in the MLflow registry.")
@click.option("--registered-model", default=None, help="Registry name (default aetrack-<dataset>-<model>).")
@click.option("--checkpoint-dir", default="checkpoints", show_default=True, help="Where the per-epoch checkpoint goes (<dir>/<run id>/last.pt).")
@click.option("--set", "settings", multiple=True, metavar="NAME=VALUE[,...]", help="Set training options by name (as MLproject passes them).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
@friendly_errors
def train(ctx, data_dir, download, tracking_uri, experiment, run_name, register, registered_model, checkpoint_dir, settings, quiet, **values):
    """Train one autoencoder variant and track it in MLflow."""
    from aetrack import data as datasets
    from aetrack.tracking import TrackingOptions, train_tracked
    from aetrack.training import resolve_device

    data_dir, registered_model = data_dir or None, registered_model or None  # MLproject passes "" for unset
    config = config_from_options(ctx, values, parse_settings(settings))
    try:
        splits = datasets.load(config.dataset, data_dir=data_dir, download=download, binarize=config.binarize,
                               val_fraction=config.val_fraction, seed=config.seed, device=resolve_device(config.device))
    except datasets.DataError as err:
        raise click.ClickException(str(err)) from None
    if REGISTRY[config.model].semi_supervised and config.labeled > len(splits.train_x):
        raise click.UsageError(f"--labeled {config.labeled} is larger than the training set ({len(splits.train_x)} examples)")
    options = TrackingOptions(tracking_uri, experiment, run_name, register, registered_model, checkpoint_dir)
    result = train_tracked(config, splits, options, data_dir=data_dir, progress=not quiet)
    history = result.history
    click.echo(f"\nrun id:           {result.run_id}")
    click.echo(f"best val loss:    {history.best_val_loss:.4f} (epoch {history.best_epoch})")
    click.echo(f"model:            {result.model_uri}")
    if result.registered_model:
        click.echo(f"registered model: models:/{result.registered_model}/{result.registered_version}")
    click.echo(f"tracking uri:     {result.tracking_uri}")
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    mlflow_cmd = "mlflow"
    if mlflow_bin.exists() and shutil.which("mlflow") != str(mlflow_bin):  # the venv is not activated
        relative = os.path.relpath(mlflow_bin)
        mlflow_cmd = relative if not relative.startswith("..") else str(mlflow_bin)
    click.echo(f"look at it:       {mlflow_cmd} ui --backend-store-uri {result.tracking_uri}   "
               f"(then open #/experiments/{result.experiment_id}/runs/{result.run_id})")


train.help += "\n\n\b\nVariants:\n" + "\n".join(f"  {name:5} {v.description}" for name, v in sorted(REGISTRY.items()))


@main.command()
@click.argument("name", required=False)
@click.option("--list", "show", is_flag=True, help="List the studies and what each trains.")
@click.option("--dataset", type=click.Choice(["digits", "mnist", "fashion-mnist", "cifar10"]), default="digits", show_default=True)
@click.option("--seeds", type=click.IntRange(1, 20), default=3, show_default=True, help="Seeds per setting (0, 1, ...).")
@click.option("--experiment", default=None, help="MLflow experiment [default: study-NAME-DATASET].")
@click.option("--set", "settings", multiple=True, metavar="NAME=VALUE[,...]",
              help="Training options every run shares, e.g. --set epochs=50 (the grid's own settings win).")
@click.option("--output", type=click.Path(file_okay=False), default=None, help="Also keep report.html and report.md here.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@apply(data_options)
@tracking_uri_option
@friendly_errors
def study(name, show, dataset, seeds, experiment, settings, output, device, data_dir, download, tracking_uri):
    """Answer one of the lesson's questions: train its grid over several seeds, evaluate every run, and write
    the compare report. Runs already finished and evaluated in the study's experiment are reused."""
    from aetrack.studies import STUDIES

    if show or not name:
        for entry in STUDIES.values():
            click.echo(entry.describe())
        return
    if name not in STUDIES:
        raise click.UsageError(f"unknown study {name!r}; choose from {', '.join(STUDIES)} (aetrack study --list)")
    chosen = STUDIES[name]
    given = parse_settings(settings)
    clash = sorted(set(given) & {"model", "dataset", "seed"})
    if clash:
        raise click.UsageError(f"--set {', '.join(clash)}: a study chooses these itself")
    try:
        base = TrainConfig(**{k: _parse(HINTS[k], v) for k, v in given.items()})
    except ValueError as err:
        raise click.UsageError(f"--set: {err}") from None
    models = [REGISTRY[str(setting["model"])] for setting in chosen.grid]
    unused = [k for k in given if (scope := FIELDS[k].metadata["scope"]) and not any(scope in v.scopes for v in models)]
    if unused:
        raise click.UsageError(f"--set {', '.join(unused)}: no model of study {name} takes it")
    for setting in chosen.grid:
        check(dataclasses.replace(base, **setting))
    if download:
        from aetrack import data as datasets

        datasets.load(dataset, data_dir=data_dir, download=True)
    from aetrack.studies import run_study
    from aetrack.training import resolve_device

    result = run_study(chosen, dataset=dataset, seeds=seeds, experiment=experiment, base=base, data_dir=data_dir,
                       tracking_uri=tracking_uri, device=str(resolve_device(device)),
                       echo=lambda line: click.echo(line, err=True), report_dir=output)
    click.echo(f"{chosen.question}  ({dataset}, {seeds} seed{'s' if seeds > 1 else ''}: mean ± standard deviation)")
    click.echo(result.text())
    click.echo(f"\nreport: run {result.report_run_id} in experiment {result.experiment!r} "
               f"(comparison/report.html){f'; local copy in {output}' if output else ''}")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

# Commands of the other modules join the group here.
from aetrack.compare import compare  # noqa: E402
from aetrack.evaluation import evaluate  # noqa: E402

main.add_command(evaluate)
main.add_command(compare)

from aetrack.registry import generate, models, promote  # noqa: E402

main.add_command(promote)
main.add_command(models)
main.add_command(generate)

from aetrack.tuning import tune  # noqa: E402

main.add_command(tune)


if __name__ == "__main__":
    sys.exit(main())
