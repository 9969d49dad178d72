"""`aetrack promote`, `aetrack models` and `aetrack generate`: the MLflow model registry from the command line."""

from __future__ import annotations

import json

import click

from aetrack.cli.options import friendly_errors, tracking_uri_option, use_tracking_uri


@click.command()
@click.argument("name")
@click.argument("version")
@click.option("--alias", default="champion", show_default=True, help="The alias to point at VERSION.")
@tracking_uri_option
@friendly_errors
def promote(name, version, alias, tracking_uri):
    """Point ALIAS of registered model NAME at VERSION; serve it as models:/NAME@ALIAS."""
    from mlflow import MlflowClient

    from aetrack.tracking import access, registry

    use_tracking_uri(tracking_uri)
    access.check_model(name)  # with logins: one line naming user, model and permission, not MLflow's 403
    registry.promote(MlflowClient(), name, version, alias)
    click.echo(f"models:/{name}@{alias} -> version {version}")


@click.command()
@click.option("--name", "pattern", default="aetrack-%", show_default=True, help="Registered model names to list (SQL LIKE).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@tracking_uri_option
@friendly_errors
def models(pattern, as_json, tracking_uri):
    """List registered aetrack models: versions, aliases and key test metrics."""
    from mlflow import MlflowClient

    from aetrack.tracking.registry import registered_versions

    use_tracking_uri(tracking_uri)
    rows = registered_versions(MlflowClient(), pattern)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no registered model matches {pattern!r}")
        return
    table = [("NAME", "VERSION", "ALIASES", "RUN", "CREATED", "METRICS")]
    for row in rows:
        metrics = "  ".join(f"{key}={value:.4g}" for key, value in row["metrics"].items())
        table.append((row["name"], str(row["version"]), ",".join(row["aliases"]) or "-", (row["run_id"] or "-")[:8],
                      row["created"], metrics or "-"))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]) - 1)]
    for line in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[-1])


@click.command()
@click.argument("model_uri")
@click.option("-n", "count", default=64, show_default=True, type=click.IntRange(min=1), help="How many images.")
@click.option("--label", type=int, default=None, help="Class to generate (cvae, m2).")
@click.option("--seed", type=int, default=0, show_default=True, help="The same seed gives the same images.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Scale of the prior noise.")
@click.option("--nrow", default=8, show_default=True, help="Images per row of the grid.")
@click.option("-o", "--output", default="samples.png", show_default=True, type=click.Path(dir_okay=False),
              help="Where the grid PNG goes.")
@tracking_uri_option
@friendly_errors
def generate(model_uri, count, label, seed, temperature, nrow, output, tracking_uri):
    """Generate images from MODEL_URI (models:/NAME@ALIAS, runs:/ID/model or a folder) offline,
    through the same pyfunc model that `mlflow models serve` runs, and save them as one grid PNG."""
    from aetrack.tracking.registry import generate_grid

    use_tracking_uri(tracking_uri)
    grid, drawn = generate_grid(model_uri, count, label=label, seed=seed, temperature=temperature, nrow=nrow)
    grid.save(output)
    click.echo(f"{drawn} images from {model_uri} -> {output}")
