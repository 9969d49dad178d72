"""End to end: `aetrack train` for every variant against a real `mlflow server` on loopback,
read back with MlflowClient; and `mlflow run .` on the embedded data set."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from aetrack.cli import main
from aetrack.tracking.run import run_params
from aetrack.config import TrainConfig
from aetrack.models import REGISTRY
from aetrack.tracking.artifacts import model_uri_of

REPO = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "2", "--hidden", "32", "--latent-dim", "2", "--batch-size", "64", "--log-every", "5", "--quiet"]
EXTRA = {"m2": ["--labeled", "50"], "dae": ["--noise", "masking"], "vae": ["--prior", "mog"]}


def image_keys(client: MlflowClient, run_id: str) -> set[str]:
    """Keys of images logged with mlflow.log_image(key=..., step=...)."""
    return {image_name(a.path)[0] for a in client.list_artifacts(run_id, "images")}


def image_name(path: str) -> list[str]:
    # key%step%N%timestamp%... ('%' becomes '+' once stored through the server; a '/' in the key is '~')
    return re.split("[%+]", Path(path).name.replace("~", "/"))


def train(args: list[str]):
    result = CliRunner().invoke(main, ["train", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run_id = next(line.split()[-1] for line in result.output.splitlines() if line.startswith("run id:"))
    return run_id, result.output


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_variant_trains_and_lands_in_mlflow(name, mlflow_server):
    experiment = f"e2e-{name}"
    extra = EXTRA.get(name, [])
    if REGISTRY[name].stacked:  # built on a logged VAE: one trained first, in the same store
        m1_run, _ = train(["--model", "vae", *TINY, "--latent-dim", "6", "--epochs", "10", "--kl-warmup", "0",
                           "--tracking-uri", mlflow_server, "--experiment", f"{experiment}-m1", "--no-register"])
        extra = ["--labeled", "50", "--features", m1_run]
    run_id, output = train(["--model", name, *TINY, *extra, "--tracking-uri", mlflow_server,
                            "--experiment", experiment, "--registered-model", f"e2e-{name}"])
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"

    # Params: what the run is and the settings it changed, flat, under the CLI names; they rebuild the config.
    config = TrainConfig.from_params(run.data.params)
    assert config.model == name and config.hidden == (32,) and config.latent_dim == 2 and config.epochs == 2
    assert run.data.params == run_params(config)
    assert {"model", "dataset", "hidden", "latent_dim", "epochs"} <= run.data.params.keys()
    assert "seed" not in run.data.params and "lr" not in run.data.params  # defaults: MLflow prints params on cards
    assert run.info.run_name.startswith(f"{name}-") and run.info.run_name.endswith("-z2-digits"), run.info.run_name
    assert f"**{name}**" in run.data.tags["mlflow.note.content"]
    assert run.data.tags["model"] == name and run.data.tags["dataset"] == "digits"
    assert run.data.tags["aetrack_version"]

    # Metric histories: the batch loss every few optimiser steps; per epoch (step = epoch) the training and
    # validation losses and the validation loss's parts.
    step_loss = client.get_metric_history(run_id, "per_step/loss")
    steps_per_epoch = -(-int(1797 * 0.8 * 0.9) // 64)
    assert len(step_loss) >= 2 * steps_per_epoch // 5
    assert [m.step for m in step_loss] == sorted(m.step for m in step_loss)
    assert [m.step for m in client.get_metric_history(run_id, "loss/val")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run_id, "loss/train")] == [1, 2]
    assert len(client.get_metric_history(run_id, "per_step/recon_loss")) == len(step_loss)
    for key in ("system/epoch_time", "system/samples_per_sec", "val/recon_loss", "val/best_loss", "val/best_epoch"):
        assert key in run.data.metrics, key
    # A constant rate is the param `lr`: as a chart MLflow draws it on a -0.5 ... 0.5 axis that reads as 0.
    assert "optim/lr" not in run.data.metrics
    if REGISTRY[name].generative:
        assert "per_step/kl" in run.data.metrics and "val/kl" in run.data.metrics
    if name == "m2":
        assert "per_step/classifier_loss" in run.data.metrics and "val/error" in run.data.metrics
    if name in ("sae", "cae"):
        assert "per_step/penalty" in run.data.metrics

    # Images with steps: per-epoch reconstructions (and samples) from step 0, final pictures at one step.
    keys = image_keys(client, run_id)
    assert {"progress/reconstructions", "result/reconstructions", "result/samples", "result/interpolation",
            "result/latent_2d", "result/loss_curves"} <= keys, keys
    assert REGISTRY[name].generative == ("progress/samples" in keys)
    steps = {image_name(a.path)[0]: set() for a in client.list_artifacts(run_id, "images")}
    for a in client.list_artifacts(run_id, "images"):
        steps[image_name(a.path)[0]].add(image_name(a.path)[2])
    assert steps["progress/reconstructions"] == {"0", "1", "2"}
    assert all(steps[key] == {"0"} for key in keys if key.startswith("result/"))

    # The data set as an MLflow input.
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["digits"]

    # The logged model loads and generates.
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(model_uri_of(run_id))
    assert model.metadata.get_input_schema() is not None
    answer = model.predict(pd.DataFrame({"n": [3]}), params={"seed": 1, "output": "array"})
    pixels = np.stack(answer["pixels"].to_numpy())
    assert pixels.shape == (3, 64) and 0 <= pixels.min() and pixels.max() <= 1

    # Generative models are registered, a new version per run.
    if REGISTRY[name].generative:
        assert f"models:/e2e-{name}/" in output
        versions = client.search_model_versions(f"name='e2e-{name}'")
        assert [v.run_id for v in versions] == [run_id]


def test_bad_input_is_one_line_and_logs_nothing(mlflow_server):
    client = MlflowClient(mlflow_server)
    for args, expected in [
        (["--model", "ae", "--prior", "mog"], "--prior does not apply to --model ae"),
        (["--model", "m2", "--labeled", "100000"], "--labeled 100000 is larger than the training set"),
        (["--dataset", "mnist", "--data-dir", "/nonexistent"], "mnist: expected"),
        (["--dataset", "imagenet"], "imagenet"),
        (["--latent-dim", "0"], "--latent-dim must be at least 1"),
    ]:
        result = CliRunner().invoke(main, ["train", *args, "--tracking-uri", mlflow_server, "--experiment", "bad"])
        assert result.exit_code != 0, args
        assert expected in result.output, result.output
        assert "Traceback" not in result.output
        error_lines = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert len(error_lines) == 1
    experiment = client.get_experiment_by_name("bad")
    assert experiment is None or not client.search_runs([experiment.experiment_id])


@pytest.mark.slow
def test_a_run_is_reproducible_with_its_seed(tmp_path):
    uri = f"sqlite:///{tmp_path}/repro.db"
    first, _ = train(["--model", "vae", *TINY, "--tracking-uri", uri, "--no-register", "--seed", "3"])
    second, _ = train(["--model", "vae", *TINY, "--tracking-uri", uri, "--no-register", "--seed", "3"])
    client = MlflowClient(uri)
    loss = [[m.value for m in client.get_metric_history(run, "loss/val")] for run in (first, second)]
    assert loss[0] == loss[1]


@pytest.mark.slow
def test_a_finished_run_leaves_no_checkpoint_behind(tmp_path):
    # Checkpoints are written every epoch (tests/test_reliability.py resumes from them); a finished run removes its own.
    train(["--model", "ae", *TINY, "--tracking-uri", f"sqlite:///{tmp_path}/c.db", "--checkpoint-dir", str(tmp_path / "ck")])
    assert not (tmp_path / "ck").exists()


def test_mlflow_run_uses_one_run_with_the_metrics(tmp_path):
    uri = f"sqlite:///{tmp_path}/project.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    command = [str(Path(sys.executable).parent / "mlflow"), "run", str(REPO), "--env-manager", "local",
               "--experiment-name", "project", "-P", "epochs=2", "-P", "latent_dim=2",
               "-P", "set=hidden=32,prior=mog,prior_components=3"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("project").experiment_id])
    assert len(runs) == 1  # no second, orphaned run
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["prior"] == "mog" and run.data.params["latent_dim"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "loss/val")) == 2
    assert "progress/reconstructions" in image_keys(client, run.info.run_id)
    assert run.info.run_name == "vae-mog-z2-digits"  # MLflow's random name, replaced
    assert client.search_model_versions("name='aetrack-digits-vae'")[0].run_id == run.info.run_id


def test_mlflow_prints_no_view_run_lines_of_its_own(mlflow_server, tmp_path, monkeypatch):
    """MLflow printed "🏃 View run ... / 🧪 View experiment ..." at the end of every run against a tracking server:
    once per trial of a study, beside aetrack's own "look at it" line."""
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    result = CliRunner().invoke(main, ["tune", "--model", "ae", "--hidden", "16", "--latent-dim", "2", "--epochs", "1",
                                       "--n-trials", "2", "--param", "lr=float:1e-3:1e-2:log", "--no-register",
                                       "--threads", "1", "--storage", f"sqlite:///{tmp_path}/optuna.db",
                                       "--tracking-uri", mlflow_server, "--experiment", "quiet-urls"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(mlflow_server)
    experiments = [e.experiment_id for e in client.search_experiments() if e.name.startswith("quiet-urls")]
    assert len(client.search_runs(experiments)) >= 3  # the study's run and its two trials ended: MLflow had its chances
    assert "View run" not in result.output and "View experiment" not in result.output, result.output
