"""`aetrack study`: answer one of the lesson's questions (aetrack.tracking.studies)."""

from __future__ import annotations

import dataclasses

import click

from aetrack.cli.options import apply, data_options, device_option, friendly_errors, tracking_uri_option, use_tracking_uri
from aetrack.config import DATASETS, ConfigError, TrainConfig, field_scope, from_strings, parse_settings
from aetrack.models import REGISTRY
from aetrack.tracking.studies import STUDIES


@click.command()
@click.argument("name", required=False)
@click.option("--list", "show", is_flag=True, help="List the studies and what each trains.")
@click.option("--dataset", type=click.Choice(DATASETS), default=TrainConfig.dataset, show_default=True)
@click.option("--seeds", type=click.IntRange(1, 20), default=3, show_default=True, help="Seeds per setting (0, 1, ...).")
@click.option("--experiment", default=None, help="MLflow experiment [default: study-NAME-DATASET].")
@click.option("--set", "settings", multiple=True, metavar="NAME=VALUE[,...]",
              help="Training options every run shares, e.g. --set epochs=50 (the grid's own settings win).")
@click.option("--output", type=click.Path(file_okay=False), default=None, help="Also keep report.html and report.md here.")
@device_option
@apply(data_options)
@tracking_uri_option
@friendly_errors
def study(name, show, dataset, seeds, experiment, settings, output, device, data_dir, download, tracking_uri):
    """Answer one of the lesson's questions: train its grid over several seeds, evaluate every run, and write
    the compare report. Runs already finished and evaluated in the study's experiment are reused."""
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
        base = from_strings(TrainConfig, given)
    except ConfigError as err:
        raise click.UsageError(f"--set: {err}") from None
    models = [REGISTRY[str(setting["model"])] for setting in chosen.grid]
    unused = [k for k in given if (scope := field_scope(k)) and not any(scope in v.scopes for v in models)]
    if unused:
        raise click.UsageError(f"--set {', '.join(unused)}: no model of study {name} takes it")
    for setting in chosen.grid:
        dataclasses.replace(base, **setting).validate()
    from aetrack import data as datasets
    from aetrack.config import resolve_device
    from aetrack.tracking.studies import run_study

    if download:
        datasets.load(dataset, data_dir=data_dir, download=True)
    from aetrack.tracking.compare import COMPARISONS_SUFFIX

    use_tracking_uri(tracking_uri)
    result = run_study(chosen, dataset=dataset, seeds=seeds, experiment=experiment, base=base, data_dir=data_dir,
                       device=str(resolve_device(device)), echo=lambda line: click.echo(line, err=True), report_dir=output)
    click.echo(f"{chosen.question}  ({dataset}, {seeds} seed{'s' if seeds > 1 else ''}: mean ± standard deviation)")
    click.echo(result.text())
    click.echo(f"\nreport: run {result.report_run_id} in experiment {result.experiment + COMPARISONS_SUFFIX!r} "
               f"(comparison/report.html){f'; local copy in {output}' if output else ''}")
