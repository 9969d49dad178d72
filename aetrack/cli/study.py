"""`aetrack study`: answer one of the lesson's questions (aetrack.tracking.workflows.studies)."""

from __future__ import annotations

import dataclasses

import click

from aetrack.cli.options import apply, data_options, device_option, friendly_errors, tracking_uri_option, use_tracking_uri
from aetrack.config import DATASETS, ConfigError, TrainConfig, field_scope, from_strings, parse_settings
from aetrack.models import REGISTRY
from aetrack.tracking.workflows.studies import STUDIES


@click.command()
@click.argument("name", required=False)
@click.option("--list", "show", is_flag=True, help="List the studies and what each trains.")
@click.option("--dataset", type=click.Choice(DATASETS), default=TrainConfig.dataset, show_default=True)
@click.option("--seeds", type=click.IntRange(1, 20), default=3, show_default=True, help="Seeds per setting (0, 1, ...).")
@click.option("--experiment", default=None, help="MLflow experiment [default: study-NAME-DATASET].")
@click.option("--set", "settings", multiple=True, metavar="NAME=VALUE[,...]",
              help="Training options every run shares, e.g. --set epochs=50 (the grid's own settings win).")
@click.option("--output", type=click.Path(file_okay=False), default=None, help="Also keep report.html and report.md here.")
@click.option("--only", multiple=True, metavar="NAME=VALUE[,...]",
              help="Only the grid's settings with these values (and the runs they need), e.g. --only arch=mlp,noise=masking.")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Worker processes on this machine (one torch thread each) that share the grid.")
@click.option("--storage", default=None, envvar="AETRACK_STUDY_STORAGE", show_envvar=True, metavar="URL",
              help="SQLAlchemy URL of the database where workers lease the grid's runs: the team's PostgreSQL for "
                   "workers on several hosts (with one MLflow server) [default: one machine, no database needed].")
@click.option("--lease", type=click.FloatRange(5, 86_400), default=120.0, show_default=True, metavar="SECONDS",
              help="A worker renews its claim on a run every third of this; a killed worker's run is retrained by "
                   "another this long after.")
@device_option
@apply(data_options)
@tracking_uri_option
@friendly_errors
def study(name, show, dataset, seeds, experiment, settings, output, only, workers, storage, lease, device, data_dir, download,
          tracking_uri):
    """Answer one of the lesson's questions: train its grid over several seeds, evaluate every run, and write
    the compare report. Runs already finished and evaluated in the study's experiment are reused."""
    if show or not name:
        from aetrack.tracking.workflows.study_runner import last_measured

        for entry in STUDIES.values():
            times = last_measured(entry.name)
            measured = "; last measured: " + ", ".join(
                f"{where} {seconds / 60:.0f} min, {count} seed(s)"
                f"{'' if settings == len(entry.grid) else f' of an earlier grid of {settings} settings'} ({date})"
                for where, (seconds, count, settings, date) in times.items()) if times else ""
            click.echo(entry.describe(seeds, measured))
        return
    if name not in STUDIES:
        raise click.UsageError(f"unknown study {name!r}; choose from {', '.join(STUDIES)} (aetrack study --list)")
    chosen = STUDIES[name]
    if only:
        try:
            chosen = chosen.restricted(parse_settings(only))
        except ConfigError as err:
            raise click.UsageError(f"--only: {str(err).replace('--set expects', 'expects')}") from None
        if not chosen.grid:
            raise click.UsageError(f"--only {' '.join(only)}: no setting of study {name} matches (aetrack study --list)")
    given = parse_settings(settings)
    clash = sorted(set(given) & {"model", "dataset", "seed"})
    if clash:
        raise click.UsageError(f"--set {', '.join(clash)}: a study chooses these itself")
    try:
        base = from_strings(TrainConfig, given)
    except ConfigError as err:
        raise click.UsageError(f"--set: {err}") from None
    if storage and not storage.split(":", 1)[0].startswith(("sqlite", "postgresql", "mysql")):
        raise click.UsageError(f"--storage {storage!r}: give an SQLAlchemy URL, e.g. postgresql://user:pass@host/db")
    models = [REGISTRY[str(setting["model"])] for setting in chosen.grid]
    unused = [k for k in given if (scope := field_scope(k)) and not any(scope in v.scopes for v in models)]
    if unused:
        raise click.UsageError(f"--set {', '.join(unused)}: no model of study {name} takes it")
    try:
        dataclasses.replace(base, dataset=dataset).validate()  # what --set gives, even where the grid overrides it
    except ConfigError as err:
        raise click.UsageError(str(err)) from None
    for setting in chosen.grid:
        # An "@KEY" value names another run of the grid; its own checks happen once that run exists.
        concrete = {k: v for k, v in setting.items() if not (isinstance(v, str) and v.startswith("@"))}
        try:
            dataclasses.replace(base, dataset=dataset, **concrete).validate()
        except ConfigError as err:
            raise click.UsageError(f"{name} on {dataset}: {err}") from None
    from aetrack import data as datasets
    from aetrack.config import resolve_device
    from aetrack.tracking.workflows.study_runner import run_study

    if download:
        datasets.load(dataset, data_dir=data_dir, download=True)
    from aetrack.tracking.reports.compare import COMPARISONS_SUFFIX

    use_tracking_uri(tracking_uri)
    result = run_study(chosen, dataset=dataset, seeds=seeds, experiment=experiment, base=base, data_dir=data_dir,
                       device=str(resolve_device(device)), echo=lambda line: click.echo(line, err=True), report_dir=output,
                       workers=workers, storage=storage, lease=lease)
    click.echo(f"{chosen.question}  ({dataset}, {seeds} seed{'s' if seeds > 1 else ''}: mean ± standard deviation)")
    click.echo(result.text())
    if chosen.better:
        click.echo("\nstrengths (+: best third of the settings) and weaknesses (-: worst third):")
        click.echo(result.strengths_text())
    click.echo(f"\nreport: run {result.report_run_id} in experiment {result.experiment + COMPARISONS_SUFFIX!r} "
               f"(comparison/report.html){f'; local copy in {output}' if output else ''}")
