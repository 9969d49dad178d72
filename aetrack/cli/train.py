"""`aetrack train`: training options are generated from TrainConfig's fields."""

from __future__ import annotations

import contextlib
import shlex
import tempfile
from pathlib import Path

import click

from aetrack.cli.options import (GroupedHelp, apply, config_options, data_options, explicit_options, friendly_errors,
                                 run_made_by_mlflow_run, settings_option, tracking_uri_option, train_config, ui_hint,
                                 use_tracking_uri)
from aetrack.config import TrackingOptions, TrainConfig, option_name, parse_settings
from aetrack.models import REGISTRY


@click.command(cls=GroupedHelp)
@config_options(TrainConfig)
@apply(data_options)
@tracking_uri_option
@config_options(TrackingOptions)
@click.option("--resume", "resume_run", default=None, metavar="RUN_ID",
              help="Go on with a stopped (KILLED or FAILED) run from its last checkpoint, with the run's own settings.")
@settings_option
@click.option("--quiet", is_flag=True, help="No progress bar and no epoch lines; only the summary.")
@click.pass_context
@friendly_errors
def train(ctx, data_dir, download, tracking_uri, experiment, run_name, register, registered_model, checkpoint_dir,
          resume_run, settings, quiet, **values):
    """Train one autoencoder variant and track it in MLflow.

    \b
    Examples:
      aetrack train                                     # the default job: a VAE on digits, to convergence
      aetrack train --model cvae --dataset mnist --data-dir data --epochs 100

    SIGINT (Ctrl-C) or SIGTERM stops the run as KILLED, with every metric sent and the last finished epoch's
    checkpoint kept; the line printed then gives the command that resumes it (--resume RUN_ID)."""
    data_dir, registered_model = data_dir or None, registered_model or None  # MLproject passes "" for unset
    resume = None
    if resume_run:
        given = explicit_options(ctx, TrainConfig, parse_settings(settings))
        if given:
            raise click.UsageError(f"--resume goes on with the run's own settings; drop "
                                   f"{', '.join(option_name(name) for name in sorted(given))}")
    else:
        config, _ = train_config(ctx, values, settings)
    check_names(experiment, registered_model)
    check_writable(checkpoint_dir)
    # Heavy imports only once the settings are known to be usable: a usage error stays instant.
    from aetrack import data as datasets
    from aetrack.tracking import access
    from aetrack.tracking.run import RunStopped, open_checkpoint, registered_name, train_tracked
    from aetrack.tracking import describe

    if resume_run:
        use_tracking_uri(tracking_uri)
        resume = open_checkpoint(resume_run, checkpoint_dir)
        config = TrainConfig.from_params(resume["config"])
    splits = datasets.load_for(config, data_dir=data_dir, download=download)
    datasets.check_fits(config, splits)
    if not resume_run:
        use_tracking_uri(tracking_uri)
    options = TrackingOptions(experiment=experiment, run_name=run_name, register=register,
                              registered_model=registered_model, checkpoint_dir=checkpoint_dir)
    # With logins: may this user create the run and register the model? Asked before any work, one line if not.
    registers = register and (REGISTRY[config.model].generative or registered_model)
    access.check_training(None if resume_run else experiment,
                          (registered_model or registered_name(config)) if registers else None)
    use_threads(config)
    try:
        result = train_tracked(config, splits, options, data_dir=data_dir, progress=not quiet, resume=resume,
                               reuse_run_id=None if resume else run_made_by_mlflow_run())
    except RunStopped as stop:
        if stop.epoch < 1:  # no epoch finished, so no checkpoint: a --resume would fail
            click.echo(f"\n{stop}; it stopped before its first epoch ended, so there is no checkpoint to resume "
                       "from: run the same command again", err=True)
            ctx.exit(128 + stop.signum)
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
    if result.crowning is not None and result.crowning.version is not None:
        crowning = result.crowning
        click.echo(f"champion:         models:/{crowning.model}@champion -> version {crowning.version}"
                   + ("" if crowning.crowned else f" ({crowning.note})"))
    click.echo(f"tracking uri:     {result.tracking_uri}")
    click.echo(f"look at it:       {ui_hint(result.tracking_uri, describe.ui_page(result.experiment_id, result.run_id))}")


def use_threads(config: TrainConfig) -> None:
    """On a CPU, one torch thread for a model too small to share its steps (`memory.cpu_threads`), unless
    OMP_NUM_THREADS says how many."""
    import os

    import torch

    from aetrack import memory
    from aetrack.config import resolve_device

    if "OMP_NUM_THREADS" not in os.environ and resolve_device(config.device).type == "cpu":
        torch.set_num_threads(memory.cpu_threads(config, len(os.sched_getaffinity(0))))


def check_names(experiment: str, registered_model: str | None) -> None:
    """Names MLflow would refuse, refused here by MLflow's own rules, before a run is opened (the registry's name
    otherwise fails after the whole training)."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils import validation

    checks = [("--experiment", experiment, validation._validate_experiment_name),
              ("--registered-model", registered_model, validation._validate_model_name)]
    for flag, value, validate in checks:
        if value is None:
            continue
        try:
            if not value.strip():
                raise MlflowException("it is empty")
            validate(value)
        except MlflowException as err:
            raise click.UsageError(f"{flag} {value!r}: {first_line(err.message)}") from None


def check_writable(folder: str) -> None:
    """--checkpoint-dir must take a file now, not at the end of the first epoch."""
    path = Path(folder).expanduser()
    made = [parent for parent in (path, *path.parents) if not parent.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as err:
        raise click.UsageError(f"--checkpoint-dir {folder}: cannot write there ({err.strerror or type(err).__name__})") from None
    finally:
        for parent in made:  # leave no trace of the probe; a run makes the folder again when it saves
            with contextlib.suppress(OSError):
                parent.rmdir()


def first_line(text: str) -> str:
    return (str(text).strip().splitlines() or [""])[0]


train.help += "\n\n\b\nVariants:\n" + "\n".join(f"  {name:5} {v.description}" for name, v in sorted(REGISTRY.items()))
