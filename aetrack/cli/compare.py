"""`aetrack compare`: one report over an experiment's runs (aetrack.tracking.reports.compare)."""

from __future__ import annotations

import re
from pathlib import Path

import click

from aetrack.cli.options import friendly_errors, tracking_uri_option, use_tracking_uri


@click.command()
@click.option("--experiment", required=True, help="MLflow experiment whose runs are compared.")
@click.option("--runs", "run_ids", multiple=True, metavar="ID[,ID...]", help="Only these runs (repeatable) [default: every finished training run].")
@click.option("--by", default=None, metavar="PARAM", help="Plot each metric against this param, one line per other varying setting.")
@click.option("--metric", "metrics", multiple=True, metavar="NAME", help="Only these test metrics (repeatable; the test/ prefix is optional) [default: all].")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None, help="Also keep report.html and report.md in this folder.")
@click.option("--run-name", default="comparison", show_default=True, help="Name of the run that holds the report.")
@click.option("--no-log", is_flag=True, help="Write the report to --output only; log nothing.")
@tracking_uri_option
@friendly_errors
def compare(experiment, run_ids, by, metrics, output, run_name, no_log, tracking_uri):
    """One HTML + Markdown report over an experiment's runs, logged to a new "comparison" run in the
    experiment EXPERIMENT-comparisons.

    \b
    Holds a table of the runs (what differs, whether each was evaluated), their test/* metrics (one row
    per metric, the better value in bold), the metrics against --by (one line per other varying setting)
    or one bar per run, the runs' validation loss curves, and their sample grids side by side.
    """
    if no_log and output is None:
        raise click.UsageError("--no-log needs --output, or the report would go nowhere")
    import mlflow

    from aetrack.cli.options import ui_hint
    from aetrack.tracking.reports.compare import COMPARISONS_SUFFIX, build_report, publish, select_runs
    from aetrack.tracking import describe

    use_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    ids = [i for item in run_ids for i in re.split(r"[,\s]+", item) if i]
    experiment_id, runs = select_runs(client, experiment, ids)
    report = build_report(runs, by=by, metrics=metrics, client=client)
    title = f"aetrack comparison: {experiment}" + (f", by {by}" if by else "")
    run_id, paths = publish(client, experiment_id, report, title, output=output, run_name=run_name, log=not no_log)
    if run_id:
        home = client.get_run(run_id).info.experiment_id
        click.echo(f"compared {len(report.rows)} runs; report logged to run {run_id} in the experiment "
                   f"{experiment}{COMPARISONS_SUFFIX}, as comparison/report.html and comparison/report.md")
        click.echo(f"look at it: {ui_hint(mlflow.get_tracking_uri(), describe.ui_page(home, run_id, 'artifacts'))}")
    if output:
        click.echo(f"local copy: {paths[0]} and {paths[1]}")
