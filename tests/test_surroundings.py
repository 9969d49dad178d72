"""What surrounds the optimisation steps (issue 24): the CPU threads a small model trains on, when the cyclic
collector runs, and the end-of-run pictures drawn while the model is written and sent."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from aetrack import memory
from aetrack.config import TrainConfig


def test_a_model_too_small_to_share_its_steps_trains_on_one_thread():
    assert memory.cpu_threads(TrainConfig(), cores=2) == 1  # digits' default MLP
    assert memory.cpu_threads(TrainConfig(dataset="mnist", hidden=(400,), latent_dim=20), cores=2) == 2
    assert memory.cpu_threads(TrainConfig(arch="conv", hidden=(32, 64)), cores=2) == 2  # not measured: left alone
    assert memory.cpu_threads(TrainConfig(batch_size=4096), cores=8) == 8


def test_one_thread_or_two_train_the_same_digits_model_to_the_bit():
    from aetrack import data as datasets
    from aetrack.training import fit

    digits = datasets.load("digits", seed=0)
    config = TrainConfig(epochs=3, patience=0)
    before = torch.get_num_threads()
    weights = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            model, _ = fit(config, digits, progress=False)
            weights.append(model.state_dict())
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.fixture
def quick_train(tmp_path, monkeypatch):
    """`aetrack train` on digits with the training itself replaced by what the test records."""
    from aetrack.cli import train as cli_train
    from aetrack.tracking import run

    seen = {}

    def fake_train_tracked(config, splits, options, **kwargs):
        seen["threads"] = torch.get_num_threads()
        raise SystemExit(0)

    monkeypatch.setattr(run, "train_tracked", fake_train_tracked)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield lambda *args: (CliRunner().invoke(cli_train.train, ["--tracking-uri", f"sqlite:///{tmp_path}/s.db", *args]), seen)
    torch.set_num_threads(before)


def test_aetrack_train_picks_the_threads_unless_omp_num_threads_says(quick_train, monkeypatch):
    _, seen = quick_train("--epochs", "1")
    assert seen["threads"] == 1
    _, seen = quick_train("--epochs", "1", "--hidden", "2048,2048")
    assert seen["threads"] == len(os.sched_getaffinity(0))  # every core this process may use
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    _, seen = quick_train("--epochs", "1")
    assert seen["threads"] == 2  # as the fixture left it


@pytest.fixture
def collector(monkeypatch):
    """The collector's settings as the test found them, restored after it."""
    monkeypatch.setattr(memory, "_frozen", False)
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)
    gc.unfreeze()


def test_the_aetrack_group_starts_every_command_with_the_start_up_collector(collector, monkeypatch):
    from aetrack.cli import main

    monkeypatch.setattr(sys, "argv", ["aetrack"])
    CliRunner().invoke(main, ["train", "--epochs", "0"])  # the group's start-up runs before the usage error
    assert gc.get_threshold() == (memory.START_UP_ALLOCATIONS, *memory.DEFAULT_THRESHOLDS[1:])


def test_training_ends_the_start_up_collector_and_freezes_what_start_up_left(collector):
    from aetrack import data as datasets
    from aetrack.training import fit

    memory.start_up()
    assert gc.get_threshold()[0] == memory.START_UP_ALLOCATIONS
    fit(TrainConfig(epochs=1), datasets.load("digits", seed=0), progress=False)
    assert gc.get_threshold() == memory.DEFAULT_THRESHOLDS
    assert gc.get_freeze_count() > 10_000  # torch's objects, among others
    gc.unfreeze()
    fit(TrainConfig(epochs=1), datasets.load("digits", seed=0), progress=False)
    assert gc.get_freeze_count() == 0  # once per process: a tuning worker's later trials collect as usual


def test_at_exit_the_collector_does_not_walk_everything_again_after_every_atexit_handler(tmp_path):
    """A command's exit: no final collection over what the process holds, but every atexit handler still runs (MLflow
    flushes there). A garbage cycle with a finaliser shows whether the final walk happened."""
    program = """
import atexit, sys
from aetrack import memory
class Cycle:
    def __del__(self):
        print("walked at exit", flush=True)
def handler():  # MLflow's flush allocates too: the walk skipped must come after it
    print("handler ran", flush=True)
    cycle = Cycle()
    cycle.itself = cycle
if sys.argv[1] != "default":
    memory.start_up()
atexit.register(handler)
if sys.argv[1] == "two commands":  # a second command in the process (CliRunner, a tuning worker)
    memory.start_up()
cycle = Cycle()
cycle.itself = cycle
del cycle
"""
    outputs = {how: subprocess.run([sys.executable, "-c", program, how], capture_output=True, text=True, check=True,
                                   timeout=60).stdout.splitlines()
               for how in ("start-up", "two commands", "default")}
    assert outputs["default"] == ["handler ran", "walked at exit", "walked at exit"]
    assert outputs["start-up"] == outputs["two commands"] == ["handler ran"]


@pytest.mark.slow
def test_the_end_of_run_pictures_are_drawn_while_the_model_is_sent(tmp_path, monkeypatch):
    from aetrack.cli.train import train
    from aetrack.tracking import run

    drawing, sent = threading.Event(), []
    draw = run.final_pictures

    def final_pictures(*args, **kwargs):
        drawing.set()
        return draw(*args, **kwargs)

    send = run.log_generator

    def log_generator(*args, **kwargs):
        sent.append(drawing.wait(timeout=60))  # before: the pictures were drawn only after the model was sent
        return send(*args, **kwargs)

    monkeypatch.setattr(run, "final_pictures", final_pictures)
    monkeypatch.setattr(run, "log_generator", log_generator)
    uri = f"sqlite:///{tmp_path}/s.db"
    result = CliRunner().invoke(train, ["--tracking-uri", uri, "--epochs", "2", "--no-register", "--quiet",
                                        "--checkpoint-dir", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert sent == [True]
    import mlflow

    client = mlflow.MlflowClient(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("aetrack").experiment_id])
    assert "warnings" not in " ".join(found.data.tags)  # every picture made it
    images = {a.path for a in client.list_artifacts(found.info.run_id, "images")}
    assert any("result~latent" in path for path in images) and any("result~loss_curves" in path for path in images)


@pytest.mark.slow
def test_the_pictures_of_each_epoch_are_composed_beside_training(tmp_path, monkeypatch):
    """The model's outputs come from the training thread; the pictures are composed (and encoded) in the logging
    thread, and arrive as before."""
    import mlflow

    from aetrack import images
    from aetrack.cli.train import train

    threads = []
    rows = images.rows
    monkeypatch.setattr(images, "rows", lambda *a, **k: threads.append(threading.current_thread().name) or rows(*a, **k))
    uri = f"sqlite:///{tmp_path}/s.db"
    result = CliRunner().invoke(train, ["--tracking-uri", uri, "--epochs", "3", "--no-register", "--quiet",
                                        "--checkpoint-dir", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert threads[:4] == ["aetrack-logging"] * 4  # steps 0 to 3, during training
    client = mlflow.MlflowClient(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("aetrack").experiment_id])
    steps = sorted(int(a.path.split("+step+")[1].split("+")[0]) for a in client.list_artifacts(found.info.run_id, "images")
                   if a.path.startswith("images/progress~reconstructions") and a.path.endswith(".png"))
    assert steps == [0, 1, 2, 3]  # every epoch of a short run; the best (3) is not logged twice


def test_a_picture_that_cannot_be_drawn_is_a_warning_and_logging_goes_on(tmp_path):
    import mlflow

    from aetrack.tracking.lifecycle import MetricBuffer

    uri = f"sqlite:///{tmp_path}/s.db"
    mlflow.set_tracking_uri(uri)
    try:
        client = mlflow.MlflowClient(uri)
        run = client.create_run(client.create_experiment("e"))
        said = []
        buffer = MetricBuffer(run.info.run_id, echo=said.append)
        buffer.image(lambda: 1 / 0, key="progress/samples", step=1)
        buffer({"train_loss": 1.5}, 1)
        assert buffer.flush(timeout=60)
    finally:
        mlflow.set_tracking_uri(None)
    assert client.get_run(run.info.run_id).data.metrics == {"per_step/loss": 1.5}
    assert any("progress/samples" in line and "ZeroDivisionError" in line for line in said), said


def test_short_epochs_share_a_request_and_none_waits_more_than_a_second(tmp_path, monkeypatch):
    import mlflow

    from aetrack.tracking import lifecycle

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/s.db")
    try:
        client = mlflow.MlflowClient()
        run = client.create_run(client.create_experiment("e"))
        buffer = lifecycle.MetricBuffer(run.info.run_id)
        batches = []
        monkeypatch.setattr(buffer.client, "log_batch", lambda run_id, metrics: batches.append(len(metrics)))
        for epoch in range(1, 21):  # twenty short epochs: one request, not twenty
            buffer({"val_loss": 1.0 / epoch, "epoch": epoch}, epoch * 10)
        buffer.flush()
        assert batches == [1, 19]  # the first epoch at once, the next nineteen together
        monkeypatch.setattr(lifecycle, "BATCH_SECONDS", 0.0)  # epochs longer than BATCH_SECONDS: one request each
        batches.clear()
        for epoch in range(21, 24):
            buffer({"val_loss": 1.0 / epoch, "epoch": epoch}, epoch * 10)
            buffer.flush()
        assert batches == [1, 1, 1]
    finally:
        mlflow.set_tracking_uri(None)


def test_logging_a_model_skips_mlflows_scan_of_every_installed_package(tmp_path, monkeypatch):
    """MLflow's check of the requirements against this environment maps every installed distribution (seconds);
    aetrack's requirements come from this environment, so the check is skipped, and the requirements logged are
    the same."""
    import mlflow
    from mlflow.utils import environment, requirements_utils

    from aetrack import data as datasets, modelio
    from aetrack.models import build_model
    from aetrack.serving import generator as served
    from aetrack.tracking import artifacts

    checks = (environment.warn_dependency_requirement_mismatches, mlflow.pyfunc.warn_dependency_requirement_mismatches)

    scans = []  # MLflow swallows any error of its check: a scan is counted, not raised
    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)
    monkeypatch.setattr(requirements_utils.importlib_metadata, "packages_distributions", lambda: scans.append(1) or {})
    digits = datasets.load("digits")
    config = TrainConfig(epochs=1)
    folder = modelio.save(build_model(config, digits.shape, digits.num_classes), modelio.ModelInfo(config, digits.shape, digits.classes),
                          tmp_path / "model")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/s.db")
    try:
        with mlflow.start_run():
            logged = artifacts.log_generator(folder)
        local = Path(mlflow.artifacts.download_artifacts(logged.model_uri, dst_path=str(tmp_path / "down")))
    finally:
        mlflow.set_tracking_uri(None)
    assert (environment.warn_dependency_requirement_mismatches, mlflow.pyfunc.warn_dependency_requirement_mismatches) == checks
    assert (local / "requirements.txt").read_text().split() == served.requirements()
    assert scans == []
