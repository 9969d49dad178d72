"""Recipes for M2 with 100 labels (issue 28), compared on the validation split only. Each recipe trains the m2-100
row's network (Kingma et al. 2014: 784-500-50, softplus, the same 100 labelled images) and is read by its validation
error, the labels of the 6,000 validation images; no test image is looked at. The recipe that wins here is then
measured once on the test set by `python benchmarks/anchors.py m2-100 --set ...`.

    python benchmarks/m2_sweep.py RECIPE --data-dir DATA [--leg-minutes M]   # a first leg
    python benchmarks/m2_sweep.py RECIPE --data-dir DATA --resume             # the next leg of a stopped one

A long recipe runs in legs (`--leg-minutes`: the run stops as SIGTERM would, its checkpoint kept); every leg is
recorded with its commit, epochs and time. No leg recorded in benchmarks/results/ runs code that differs from its
commit (elsewhere, as $AETRACK_ANCHORS_RESULTS names, it may).

Record: benchmarks/results/m2-sweep.json (one entry per recipe); rendered on docs/anchors.md (`anchors-m2-sweep`).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import click

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"
RESULTS = Path(os.environ.get("AETRACK_ANCHORS_RESULTS") or DEFAULT_RESULTS)
RECORD = "m2-sweep.json"

# name -> (the settings changed from the m2-100 row's published ones, what they are)
RECIPES = {
    "aetrack": ({"lr": 2e-3, "lr_schedule": "cosine", "keep": "last", "epochs": 150},
                "Adam at 2e-3 with cosine decay over 150 epochs"),
    "pyro": ({"lr": 4.2e-4, "batch_size": 200, "classifier_weight": 0.46, "keep": "last", "epochs": 50},
             "Pyro's ss_vae_M2 tutorial settings: Adam at 4.2e-4 (its beta1 of 0.95 is not an aetrack setting), "
             "batches of 200, the classifier's loss weighted 46 per labelled image (alpha = 0.46 x 100), 50 epochs"),
    "classifier-0.001": ({"lr": 2e-3, "lr_schedule": "cosine", "keep": "last", "classifier_weight": 0.001,
                          "epochs": 150},
                         "the m2-100 row's recipe with the classifier's loss weighted 0.1 (alpha = 0.001 x 100), "
                         "not 10"),
    "constant-1000": ({"keep": "last"},
                      "the published settings at their full length: Adam at a constant 3e-4 for 1000 epochs"),
}


def records() -> dict:
    path = RESULTS / RECORD
    return json.loads(path.read_text()) if path.exists() else {}


def write(name: str, entry: dict) -> None:
    found = records()
    found[name] = entry
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / RECORD).write_text(json.dumps(found, indent=2, sort_keys=True) + "\n")


def validation_curve(run_id: str) -> list[float]:
    """The run's validation error (%) per epoch, as MLflow has it: the legs before this one included."""
    import mlflow

    from aetrack.tracking import metric_names as names

    points = mlflow.MlflowClient().get_metric_history(run_id, names.logged("val_error"))
    by_epoch = {m.step: m.value for m in points}
    return [round(100 * by_epoch[e], 4) for e in sorted(by_epoch)]


def summary(curve: list[float]) -> dict:
    best = min(range(len(curve)), key=curve.__getitem__) if curve else None
    return {"epochs_run": len(curve), "val_error_last": curve[-1] if curve else None,
            "val_error_best": curve[best] if curve else None, "best_epoch": best + 1 if curve else None,
            "val_error_last_10_mean": round(sum(curve[-10:]) / len(curve[-10:]), 4) if curve else None}


@click.command()
@click.argument("recipe", type=click.Choice(sorted(RECIPES)))
@click.option("--data-dir", default=None, envvar="AETRACK_DATA_DIR", show_envvar=True)
@click.option("--epochs", type=click.IntRange(1), default=None, help="Train this many epochs, not the recipe's.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tracking-uri", default=None, help="Where the runs go [default: $MLFLOW_TRACKING_URI, else MLflow's default].")
@click.option("--checkpoint-dir", default="checkpoints", show_default=True)
@click.option("--leg-minutes", type=click.FloatRange(min=0.1), default=None,
              help="Stop training after this many minutes (KILLED, checkpoint kept); --resume goes on.")
@click.option("--resume", is_flag=True, help="Go on with this recipe's stopped run, as its record names it.")
@click.option("--dry-run", is_flag=True, help="Train, but do not write the record (allowed from uncommitted code).")
@click.option("--set", "settings", multiple=True, metavar="NAME=VALUE,...",
              help="Change the recipe's settings (as `aetrack train --set`); the record's command says so.")
def main(recipe, data_dir, epochs, seed, tracking_uri, checkpoint_dir, leg_minutes, resume, dry_run, settings):
    """Train RECIPE's M2 (100 labels) and record its validation error."""
    import anchors  # the m2-100 row's settings
    import mlflow

    from aetrack import data as datasets
    from aetrack.cli.options import quiet_mlflow
    from aetrack.config import ConfigError, TrainConfig, parse_settings
    from aetrack.tracking.run import RunStopped, TrackingOptions, git_commit, open_checkpoint, train_tracked

    quiet_mlflow()
    commit = git_commit()  # of the code this process runs
    if not dry_run and RESULTS == DEFAULT_RESULTS and (commit is None or commit.endswith("-dirty")):
        raise click.UsageError(f"the code differs from its commit ({commit}): commit it, or pass --dry-run")
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    before = records().get(recipe)
    state = None
    if resume:
        if not before or before.get("complete", True):
            raise click.UsageError(f"{recipe}: no stopped run to resume in {RESULTS / RECORD}")
        if before["tracking_uri"] != mlflow.get_tracking_uri():
            raise click.UsageError(f"{recipe}'s run is in {before['tracking_uri']}: pass --tracking-uri {before['tracking_uri']}")
        state = open_checkpoint(before["run_id"], checkpoint_dir)
        config = TrainConfig.from_params(state["config"])
    else:
        changes, _ = RECIPES[recipe]
        config = replace(anchors.KINGMA_M2, **changes, seed=seed)
        try:
            config = TrainConfig.from_params({**replace(config, epochs=epochs or config.epochs).to_params(),
                                              **parse_settings(settings)}).validate()
        except ConfigError as err:
            raise click.UsageError(str(err)) from None
        before = None
    data = datasets.load_for(config, data_dir=data_dir)
    options = TrackingOptions(experiment="aetrack-m2-sweep", run_name=f"m2-sweep-{recipe}", register=False,
                              checkpoint_dir=checkpoint_dir)
    started, stopped = time.perf_counter(), None
    try:
        with anchors.leg(leg_minutes):
            run_id = train_tracked(config, data, options, data_dir=data_dir, progress=sys.stderr.isatty(),
                                   resume=state).run_id
    except RunStopped as stop:
        stopped, run_id = stop, stop.run_id
    curve, published = validation_curve(run_id), anchors.KINGMA_M2.to_params()
    if not curve:
        raise click.ClickException(f"{recipe}: the leg ended before its first epoch did; give --leg-minutes more time")
    leg = {"git_commit": commit, "epochs_to": stopped.epoch if stopped else len(curve),
           "seconds": round(time.perf_counter() - started, 1),
           "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    entry = {"recipe": recipe, "description": RECIPES[recipe][1],
             "settings": {k: v for k, v in config.to_params().items() if v != published.get(k) and k != "seed"},
             "epochs_planned": config.epochs, "seed": config.seed, "complete": stopped is None,
             "legs": [*(before or {}).get("legs", []), leg], **summary(curve), "curve": curve,
             "run_id": run_id, "tracking_uri": mlflow.get_tracking_uri(),
             "command": (before or {}).get("command")  # the first leg's: the settings; later legs only say --resume
             or "python benchmarks/m2_sweep.py " + shlex.join(anchors.portable(sys.argv[1:]))}
    summary_line = {k: entry[k] for k in ("recipe", "complete", "epochs_run", "epochs_planned", "val_error_last",
                                          "val_error_best", "best_epoch")}
    click.echo(json.dumps(summary_line))
    if not dry_run:
        write(recipe, entry)
    if stopped:
        click.echo(f"{recipe}: leg {len(entry['legs'])} ended after epoch {stopped.epoch} of {stopped.epochs}; "
                   f"continue with: python benchmarks/m2_sweep.py {recipe} --resume", err=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
