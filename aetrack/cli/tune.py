"""`aetrack tune`: training options from TrainConfig, search options from TuneConfig, the space from --param."""

from __future__ import annotations

import click

from aetrack.cli.options import (apply, config_options, data_options, friendly_errors, run_made_by_mlflow_run,
                                 settings_option, tracking_uri_option, train_config, use_tracking_uri)
from aetrack.config import TrackingOptions, TrainConfig, TuneConfig, from_strings
from aetrack.models import REGISTRY
from aetrack.tuning.space import space_for

TUNE_FIELDS = tuple(TuneConfig.__dataclass_fields__)


@click.command()
@config_options(TrainConfig)
@apply(data_options)
@tracking_uri_option
@config_options(TrackingOptions)
@settings_option
@click.option("--quiet", is_flag=True, help="No line per trial; only the summary.")
@config_options(TuneConfig)
@click.option("--param", "param_specs", multiple=True, metavar="NAME=SPEC",
              help="Search NAME over SPEC: int:LOW:HIGH[:log|:STEP], float:LOW:HIGH[:log|:STEP] or cat:A,B,... (repeatable).")
@click.option("--space", "space_file", default=None, help="YAML file of NAME: SPEC lines (null drops a default).")
@click.option("--show-space", is_flag=True, help="Print the search space (as a --space file) and exit.")
@click.pass_context
@friendly_errors
def tune(ctx, data_dir, download, tracking_uri, experiment, run_name, register, registered_model, checkpoint_dir,
         settings, quiet, param_specs, space_file, show_space, **values):
    """Search hyperparameters with Optuna; every trial is an MLflow child run, the best model becomes the champion.

    Start the same command several times (on one machine or many, with one --storage and one
    --tracking-uri) and the workers share the study until --n-trials trials are done in total.
    """
    search = from_strings(TuneConfig, {k: values.pop(k) for k in TUNE_FIELDS}).validate()
    base, explicit = train_config(ctx, values, settings)
    space = space_for(REGISTRY[base.model], base, sampler=search.sampler, param_specs=param_specs,
                      space_file=space_file, fixed=explicit)
    if show_space:
        click.echo(f"# search space of --model {base.model} ({search.sampler} sampler); every other option is fixed")
        click.echo(space.to_yaml() or "# (empty: every searchable setting is fixed)")
        return
    if not space.params:
        raise click.UsageError("nothing to search: every parameter is fixed (see --show-space)")
    from aetrack.tracking.run import RunStopped, registered_name
    from aetrack.tuning.study import tune_study, tuning_experiment

    use_tracking_uri(tracking_uri)
    registered_model = (registered_model or registered_name(base)) if register else None
    if ctx.get_parameter_source("experiment") == click.core.ParameterSource.DEFAULT:
        experiment = tuning_experiment(experiment)  # trials' short curves stay out of the training runs' charts
    tracking = TrackingOptions(experiment=experiment, run_name=run_name or None, checkpoint_dir=checkpoint_dir)
    from aetrack.tracking import access

    access.check_training(experiment, registered_model)  # with logins: one line before any trial, not a 403 after
    try:
        tune_study(base, space, search, data_dir=data_dir or None, download=download, tracking=tracking,
                   registered_model=registered_model, echo=(lambda line: None) if quiet else click.echo, summary=click.echo,
                   reuse_run_id=run_made_by_mlflow_run())
    except RunStopped as stop:  # the trial's run is KILLED; the study retries it, as a new trial, when a worker starts
        click.echo(f"\nthis worker stopped: trial {stop}; start the command again to go on with the study", err=True)
        ctx.exit(128 + stop.signum)
