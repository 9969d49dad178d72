"""The MLflow model registry from the command line: aliases (not stages), a listing of aetrack's
registered models, and offline generation through the same pyfunc model that a server runs."""

from __future__ import annotations

import json
from datetime import datetime

import click

from aetrack.cliutils import friendly_errors, tracking_uri_option

KEY_METRICS = ("best_val_loss", "test_recon_loss", "test_neg_elbo", "test_nll_iw", "test_fcd",
               "test_label_accuracy", "test_error")

@click.command()
@click.argument("name")
@click.argument("version")
@click.option("--alias", default="champion", show_default=True, help="The alias to point at VERSION.")
@tracking_uri_option
@friendly_errors
def promote(name, version, alias, tracking_uri):
    """Point ALIAS of registered model NAME at VERSION; serve it as models:/NAME@ALIAS."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    client.get_model_version(name, version)  # fails in one line when there is no such version
    client.set_registered_model_alias(name, alias, version)
    click.echo(f"models:/{name}@{alias} -> version {version}")


def registered_versions(client, pattern: str) -> list[dict]:
    """Every version of the registered models whose name matches `pattern` (SQL LIKE), newest first."""
    rows = []
    for model in client.search_registered_models(filter_string=f"name LIKE '{pattern}'", order_by=["name ASC"]):
        versions = client.search_model_versions(f"name = '{model.name}'")
        for version in sorted(versions, key=lambda v: int(v.version), reverse=True):
            metrics = client.get_run(version.run_id).data.metrics if version.run_id else {}
            rows.append({
                "name": model.name,
                "version": int(version.version),
                "aliases": sorted(alias for alias, number in model.aliases.items() if str(number) == str(version.version)),
                "run_id": version.run_id,
                "created": datetime.fromtimestamp(version.creation_timestamp / 1000).strftime("%Y-%m-%d %H:%M"),
                "metrics": {key: metrics[key] for key in KEY_METRICS if key in metrics},
            })
    return rows


@click.command()
@click.option("--name", "pattern", default="aetrack-%", show_default=True, help="Registered model names to list (SQL LIKE).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@tracking_uri_option
@friendly_errors
def models(pattern, as_json, tracking_uri):
    """List registered aetrack models: versions, aliases and key test metrics."""
    from mlflow import MlflowClient

    rows = registered_versions(MlflowClient(tracking_uri=tracking_uri), pattern)
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
    import mlflow
    import torch

    from aetrack import images
    from aetrack.serving import decode_png

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    row = {"n": count} if label is None else {"n": count, "label": label}
    answer = pyfunc.predict([row], params={"seed": seed, "temperature": temperature, "output": "png"})
    pictures = [torch.from_numpy(decode_png(text)).float() / 255 for text in answer["image"]]
    batch = torch.stack([p.unsqueeze(0) if p.dim() == 2 else p.permute(2, 0, 1) for p in pictures])
    images.grid(batch, nrow).save(output)
    click.echo(f"{len(batch)} images from {model_uri} -> {output}")
