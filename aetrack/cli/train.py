"""`aetrack train`: training options are generated from TrainConfig's fields."""

from __future__ import annotations

import click

from aetrack.cli.options import (apply, config_options, data_options, friendly_errors, settings_option, tracking_options,
                                 train_config, ui_hint, use_tracking_uri)
from aetrack.config import TrackingOptions, TrainConfig
from aetrack.models import REGISTRY


@click.command()
@config_options(TrainConfig)
@apply(data_options)
@apply(tracking_options)
@click.option("--register/--no-register", default=TrackingOptions.register, show_default=True,
              help="Register generative models in the MLflow registry.")
@click.option("--registered-model", default=None, help="Registry name (default aetrack-<dataset>-<model>).")
@click.option("--checkpoint-dir", default=TrackingOptions.checkpoint_dir, show_default=True,
              help="Where the per-epoch checkpoint goes (<dir>/<run id>/last.pt).")
@settings_option
@click.option("--quiet", is_flag=True, help="No progress bar and no epoch lines; only the summary.")
@click.pass_context
@friendly_errors
def train(ctx, data_dir, download, tracking_uri, experiment, run_name, register, registered_model, checkpoint_dir, settings, quiet, **values):
    """Train one autoencoder variant and track it in MLflow."""
    config, _ = train_config(ctx, values, settings)
    from aetrack import data as datasets
    from aetrack.tracking.run import train_tracked

    data_dir, registered_model = data_dir or None, registered_model or None  # MLproject passes "" for unset
    splits = datasets.load_for(config, data_dir=data_dir, download=download)
    if REGISTRY[config.model].semi_supervised and config.labeled > len(splits.train_x):
        raise click.UsageError(f"--labeled {config.labeled} is larger than the training set ({len(splits.train_x)} examples)")
    use_tracking_uri(tracking_uri)
    options = TrackingOptions(experiment, run_name, register, registered_model, checkpoint_dir)
    result = train_tracked(config, splits, options, data_dir=data_dir, progress=not quiet)
    history = result.history
    click.echo(f"\nrun id:           {result.run_id}")
    click.echo(f"best val loss:    {history.best_val_loss:.4f} (epoch {history.best_epoch})")
    click.echo(f"model:            {result.model_uri}")
    if result.registered_model:
        click.echo(f"registered model: models:/{result.registered_model}/{result.registered_version}")
    click.echo(f"tracking uri:     {result.tracking_uri}")
    click.echo(f"look at it:       {ui_hint(result.tracking_uri, f'#/experiments/{result.experiment_id}/runs/{result.run_id}')}")


train.help += "\n\n\b\nVariants:\n" + "\n".join(f"  {name:5} {v.description}" for name, v in sorted(REGISTRY.items()))
