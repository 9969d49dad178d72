"""`aetrack train`: training options are generated from TrainConfig's fields."""

from __future__ import annotations

import shlex

import click

from aetrack.cli.options import (apply, config_options, data_options, explicit_options, friendly_errors, settings_option,
                                 tracking_options, train_config, ui_hint, use_tracking_uri)
from aetrack.config import MIN_VAL_EXAMPLES, TrackingOptions, TrainConfig, option_name, parse_settings
from aetrack.models import REGISTRY


@click.command()
@config_options(TrainConfig)
@apply(data_options)
@apply(tracking_options)
@click.option("--register/--no-register", default=TrackingOptions.register, show_default=True,
              help="Register generative models in the MLflow registry.")
@click.option("--registered-model", default=None, help="Registry name (default aetrack-<dataset>-<model>).")
@click.option("--checkpoint-dir", default=TrackingOptions.checkpoint_dir, show_default=True,
              help="Where each epoch's checkpoint goes (<dir>/<run id>/last.pt); removed when the run finishes.")
@click.option("--resume", "resume_run", default=None, metavar="RUN_ID",
              help="Go on with a stopped (KILLED or FAILED) run from its last checkpoint, with the run's own settings.")
@settings_option
@click.option("--quiet", is_flag=True, help="No progress bar and no epoch lines; only the summary.")
@click.pass_context
@friendly_errors
def train(ctx, data_dir, download, tracking_uri, experiment, run_name, register, registered_model, checkpoint_dir,
          resume_run, settings, quiet, **values):
    """Train one autoencoder variant and track it in MLflow.

    SIGINT (Ctrl-C) or SIGTERM stops the run as KILLED, with every metric sent and the last finished epoch's
    checkpoint kept; the line printed then gives the command that resumes it."""
    data_dir, registered_model = data_dir or None, registered_model or None  # MLproject passes "" for unset
    resume = None
    if resume_run:
        given = explicit_options(ctx, TrainConfig, parse_settings(settings))
        if given:
            raise click.UsageError(f"--resume goes on with the run's own settings; drop "
                                   f"{', '.join(option_name(name) for name in sorted(given))}")
    else:
        config, _ = train_config(ctx, values, settings)
    # Heavy imports only once the settings are known to be usable: a usage error stays instant.
    from aetrack import data as datasets
    from aetrack.tracking.run import RunStopped, open_checkpoint, train_tracked

    if resume_run:
        use_tracking_uri(tracking_uri)
        resume = open_checkpoint(resume_run, checkpoint_dir)
        config = TrainConfig.from_params(resume["config"])
    splits = datasets.load_for(config, data_dir=data_dir, download=download)
    if REGISTRY[config.model].semi_supervised and config.labeled > len(splits.train_y):
        raise click.UsageError(f"--labeled {config.labeled} is larger than the training set ({len(splits.train_y)} examples)")
    if len(splits.val_y) < MIN_VAL_EXAMPLES:
        raise click.UsageError(f"--val-fraction {config.val_fraction} leaves {len(splits.val_y)} validation examples; "
                               f"at least {MIN_VAL_EXAMPLES} are needed")
    if not resume_run:
        use_tracking_uri(tracking_uri)
    if config.features:  # M1+M2: a wrong or unreachable M1 is a usage error before any run is opened
        from aetrack.tracking.run import build

        build(config, splits)
    options = TrackingOptions(experiment, run_name, register, registered_model, checkpoint_dir)
    try:
        result = train_tracked(config, splits, options, data_dir=data_dir, progress=not quiet, resume=resume)
    except RunStopped as stop:
        command = ["aetrack", "train", "--resume", stop.run_id]
        for flag, value, default in (("--tracking-uri", tracking_uri, None), ("--data-dir", data_dir, None),
                                     ("--checkpoint-dir", checkpoint_dir, TrackingOptions.checkpoint_dir)):
            if value and value != default:
                command += [flag, value]
        click.echo(f"\n{stop}; resume it with: {shlex.join(command)}", err=True)
        ctx.exit(128 + stop.signum)
    history = result.history
    click.echo(f"\nrun id:           {result.run_id}")
    click.echo(f"best val loss:    {history.best_val_loss:.4f} (epoch {history.best_epoch})")
    click.echo(f"model:            {result.model_uri}")
    if result.registered_model:
        click.echo(f"registered model: models:/{result.registered_model}/{result.registered_version}")
    click.echo(f"tracking uri:     {result.tracking_uri}")
    click.echo(f"look at it:       {ui_hint(result.tracking_uri, f'#/experiments/{result.experiment_id}/runs/{result.run_id}')}")


train.help += "\n\n\b\nVariants:\n" + "\n".join(f"  {name:5} {v.description}" for name, v in sorted(REGISTRY.items()))
