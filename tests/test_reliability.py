"""Nothing lost, nothing hung: checkpoints, resume, signals, a tracking server that is absent or goes away.

The in-process tests pin the parts (a resumed fit ends with the very weights of an uninterrupted one, a checkpoint
survives a kill while it is written, a planted pickle is refused); the rest run `aetrack train` as a real process
against a real `mlflow server` and signal it as `timeout`, `docker stop` and Ctrl-C do."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner

from aetrack import checkpoints
from aetrack import data as datasets
from aetrack.cli.main import main
from aetrack.config import ConfigError, TrainConfig
from aetrack.tracking import metric_names as names
from aetrack.tracking import pictures
from aetrack.tracking import tags as tag
from aetrack import training
from aetrack.tracking import lifecycle
from aetrack.tracking.lifecycle import Interrupted
from aetrack.tracking.run import image_epochs
from aetrack.training import Diverged, fit
from conftest import aetrack_command, free_port, start_mlflow_server, stop


class StopAfter:
    """A callback that interrupts training once `epoch` has finished, before its checkpoint is written."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, epoch, model, metrics):
        if epoch == self.epoch:
            raise KeyboardInterrupt


@pytest.mark.slow
@pytest.mark.parametrize("model, extra", [("vae", {"lr_schedule": "plateau", "kl_warmup": 3}), ("m2", {}), ("dae", {}),
                                          ("ae", {"lr_schedule": "cosine", "warmup_steps": 5})])
def test_resumed_fit_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, model, extra):
    config = TrainConfig(model=model, hidden=(32,), latent_dim=4, epochs=6, patience=4, **extra)
    splits = datasets.load_for(config)
    whole, whole_history = fit(config, splits, progress=False)
    path = tmp_path / "last.pt"
    with pytest.raises(KeyboardInterrupt):
        fit(config, splits, progress=False, checkpoint=path, run_id="r1", callbacks=(StopAfter(4),))
    state = checkpoints.load(path, "r1")
    assert state["epoch"] == 3  # the interrupted epoch never reached its checkpoint
    resumed, history = fit(config, splits, progress=False, checkpoint=path, run_id="r1", resume=state)
    assert [e["epoch"] for e in history.epochs] == [e["epoch"] for e in whole_history.epochs]
    timing = {"epoch_time", "samples_per_sec"}
    assert [{k: v for k, v in e.items() if k not in timing} for e in history.epochs] == \
        [{k: v for k, v in e.items() if k not in timing} for e in whole_history.epochs]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def saves(monkeypatch) -> list[int]:
    """The epochs `fit` writes checkpoints of, in order (the writes themselves still happen)."""
    written, save = [], checkpoints.save
    monkeypatch.setattr(checkpoints, "save", lambda path, state: (written.append(state["epoch"]), save(path, state)))
    return written


@pytest.mark.slow
def test_a_fast_run_checkpoints_once_per_interval_and_always_its_last_epoch(tmp_path, monkeypatch):
    config = TrainConfig(hidden=(32,), latent_dim=2, epochs=8, patience=0)
    splits = datasets.load_for(config)
    written = saves(monkeypatch)
    monkeypatch.setattr(training, "CHECKPOINT_SECONDS", 3600.0, raising=False)
    fit(config, splits, progress=False, checkpoint=tmp_path / "last.pt", run_id="r1")
    assert written == [1, 8]  # no interval passed: only the first epoch (a kill can resume) and the end
    assert checkpoints.load(tmp_path / "last.pt", "r1")["epoch"] == 8
    written.clear()
    monkeypatch.setattr(training, "CHECKPOINT_SECONDS", 0.0, raising=False)
    fit(config, splits, progress=False, checkpoint=tmp_path / "every.pt", run_id="r1")
    assert written == list(range(1, 9))  # epochs longer than the interval: every one


@pytest.mark.slow
def test_a_sigterm_mid_epoch_writes_the_last_finished_epoch_and_resume_is_exact(tmp_path, monkeypatch):
    config = TrainConfig(hidden=(32,), latent_dim=4, epochs=6, patience=0, log_every=2)
    splits = datasets.load_for(config)
    whole, _ = fit(config, splits, progress=False)
    written = saves(monkeypatch)
    monkeypatch.setattr(training, "CHECKPOINT_SECONDS", 3600.0, raising=False)
    per_epoch = config.resolve(len(splits.train_y)).steps_per_epoch(len(splits.train_y))

    def log(metrics, step):  # a SIGTERM in the middle of epoch 5, as `timeout` or `docker stop` sends it
        if step == 4 * per_epoch + 2:
            os.kill(os.getpid(), signal.SIGTERM)

    path = tmp_path / "last.pt"
    with pytest.raises(Interrupted), lifecycle.stop_on_signals(lambda line: None):
        fit(config, splits, progress=False, checkpoint=path, run_id="r1", log=log)
    assert written == [1, 4]  # the first epoch, then at the signal: the last finished epoch, not the half-trained fifth
    resumed, _ = fit(config, splits, progress=False, checkpoint=path, run_id="r1", resume=checkpoints.load(path, "r1"))
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_kill_while_a_checkpoint_is_written_keeps_the_previous_one(tmp_path):
    path = tmp_path / "last.pt"
    checkpoints.save(path, {"run_id": "r", "epoch": 1, "weights": torch.ones(3)})
    script = textwrap.dedent(f"""
        import os, time, torch
        from pathlib import Path
        from aetrack import checkpoints
        real_save = torch.save
        def slow_save(obj, file):  # writes half, then hangs: the kill comes mid-write
            file.write(b"PK" + b"x" * 100000); file.flush(); print("writing", flush=True); time.sleep(60)
        torch.save = slow_save
        checkpoints.save(Path({str(path)!r}), {{"run_id": "r", "epoch": 2, "weights": torch.zeros(3)}})
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    process.kill()
    process.wait()
    state = checkpoints.load(path, "r")
    assert state["epoch"] == 1 and torch.equal(state["weights"], torch.ones(3))


class Planted:
    def __reduce__(self):
        return (os.system, ("touch planted-code-ran",))


def test_a_planted_pickle_is_refused_and_never_runs(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"format": checkpoints.FORMAT, "version": checkpoints.VERSION, "run_id": "r", "evil": Planted()}, path)
    with pytest.raises(checkpoints.CheckpointError, match="refused"):
        checkpoints.load(path, "r")
    assert not (tmp_path / "planted-code-ran").exists()


def test_foreign_torn_and_missing_checkpoints_are_one_line_errors(tmp_path):
    path = tmp_path / "last.pt"
    checkpoints.save(path, {"run_id": "other", "epoch": 1})
    with pytest.raises(checkpoints.CheckpointError, match="belongs to run other"):
        checkpoints.load(path, "mine")
    torch.save({"model": torch.ones(2)}, path)
    with pytest.raises(checkpoints.CheckpointError, match="not an aetrack checkpoint"):
        checkpoints.load(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(checkpoints.CheckpointError, match="not a readable checkpoint"):
        checkpoints.load(path)
    with pytest.raises(checkpoints.CheckpointError, match="no checkpoint"):
        checkpoints.load(tmp_path / "none.pt")


def test_a_diverging_fit_hands_back_its_best_epoch():
    config = TrainConfig(model="ae", hidden=(32,), latent_dim=4, epochs=8, lr=1e-3)
    splits = datasets.load_for(config)

    class Explode:  # the loss turns NaN from epoch 3 on
        def on_epoch_end(self, epoch, model, metrics):
            if epoch == 2:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))

    with pytest.raises(Diverged) as caught:
        fit(config, splits, progress=False, callbacks=(Explode(),))
    assert caught.value.history.best_epoch in (1, 2)
    assert all(torch.isfinite(p).all() for p in caught.value.model.parameters())


@pytest.mark.parametrize("args, message", [
    (["--seed", "-1"], "--seed must be between 0 and"),
    (["--seed", str(2**70)], "--seed must be between 0 and"),
    (["--val-fraction", "0.0001"], "validation examples"),
    (["--resume", "abc", "--epochs", "3"], "--resume goes on with the run's own settings; drop --epochs"),
])
def test_settings_that_cannot_work_fail_before_any_data_is_loaded(args, message):
    result = CliRunner().invoke(main, ["train", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


# What a hostile new user tried (issue 26): each was accepted and failed only after a run was opened, or never ended.
LATE_FAILURES = [
    (["--epochs", "99999999999999999999999"], "--epochs 99999999999999999999999: out of range (from 1 to 100000)"),
    (["--lr", "inf"], "--lr: inf is not a finite number"),
    (["--lr", "nan"], "--lr: nan is not a finite number"),
    (["--val-fraction", "nan"], "--val-fraction: nan is not a finite number"),
    (["--beta", "-inf"], "--beta: -inf is not a finite number"),
    (["--hidden", "100000000"], "--hidden 100000000: out of range"),
    (["--latent-dim", "1000000000"], "--latent-dim 1000000000: out of range"),
    (["--hidden", "60000,60000"], "GiB, more than this machine has available"),
    (["--registered-model", "a/b:c@d"], "--registered-model 'a/b:c@d': Invalid model name"),
    (["--experiment", ""], "--experiment '': it is empty"),
    (["--checkpoint-dir", "/proc/nope"], "--checkpoint-dir /proc/nope: cannot write there"),
]


@pytest.mark.parametrize("args, message", LATE_FAILURES, ids=[" ".join(args) for args, _ in LATE_FAILURES])
def test_a_value_that_would_fail_later_is_a_one_line_usage_error_before_any_run(tmp_path, args, message):
    store = tmp_path / "store.db"
    result = CliRunner().invoke(main, ["train", "--tracking-uri", f"sqlite:///{store}", *args])
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(error) == 1 and message in error[0], result.output
    assert "Traceback" not in result.output
    assert not store.exists()  # nothing was opened, not even the store


def test_every_numeric_setting_has_a_finite_range():
    from aetrack.config import TRAIN_RANGES, TUNE_RANGES, TuneConfig, numeric_fields

    assert set(numeric_fields(TrainConfig)) == set(TRAIN_RANGES)
    assert set(numeric_fields(TuneConfig)) == set(TUNE_RANGES)
    assert all(math.isfinite(low) and math.isfinite(high) for low, high in [*TRAIN_RANGES.values(), *TUNE_RANGES.values()])
    for cls, ranges in ((TrainConfig, TRAIN_RANGES), (TuneConfig, TUNE_RANGES)):
        for name in ranges:  # each limit is enforced (the values are only checked, not used: any field will do)
            for bad in (float("nan"), float("inf"), ranges[name][1] * 2 + 1):
                with pytest.raises(ConfigError, match=f"--{name.replace('_', '-')}"):
                    dataclasses.replace(cls(), **{name: (bad,) if isinstance(getattr(cls(), name), tuple) else bad}).validate()
    TrainConfig().validate()
    TuneConfig().validate()


def test_an_unreachable_tracking_server_is_one_line_within_30_seconds(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    done = subprocess.run([*aetrack_command(), "train", "--epochs", "1", "--tracking-uri", uri], capture_output=True,
                          text=True, timeout=120)
    took = time.monotonic() - started
    assert done.returncode == 1
    assert took < 30, took
    lines = [line for line in done.stderr.splitlines() if line.strip() and "Warning" not in line and "warning" not in line
             and "color_warning" not in line]
    assert len(lines) == 1 and uri in lines[0] and "does not answer" in lines[0], done.stderr


def train_process(uri: str, tmp_path: Path, *args: str) -> subprocess.Popen:
    """`aetrack train` as a process; stdout is a pipe, stderr (progress bars: a pipe could fill) a file."""
    err = open(tmp_path / f"stderr-{time.monotonic_ns()}.txt", "w+")
    process = subprocess.Popen([*aetrack_command(), "train", "--hidden", "32", "--latent-dim", "2", "--no-register",
                                "--tracking-uri", uri, "--experiment", "reliability", *args],
                               stdout=subprocess.PIPE, stderr=err, text=True, cwd=tmp_path)
    process.err_file = err
    return process


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    out, _ = process.communicate(timeout=timeout)
    process.err_file.seek(0)
    return out, process.err_file.read()


def wait_for_epoch(process: subprocess.Popen, epoch: int) -> list[str]:
    """Read the process's stdout until it has printed the line of `epoch`."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith(f"epoch {epoch}:"):
            return lines
    process.err_file.seek(0)
    raise AssertionError(f"the run ended before epoch {epoch}: {''.join(lines)[-2000:]}{process.err_file.read()[-2000:]}")


def history(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_after_a_stop_a_late_repeated_signal_cannot_change_the_exit_status():
    """A second Ctrl-C that came after the run was closed met Python's own handler again and turned the exit
    status 130 into death by SIGINT (-2). After a stop the signals are ignored; without one, restored."""
    from aetrack.tracking import lifecycle

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with lifecycle.stop_on_signals(lambda _: None):
            pass
        assert {sig: signal.getsignal(sig) for sig in before} == before
        with pytest.raises(lifecycle.Interrupted):
            with lifecycle.stop_on_signals(lambda _: None):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN is signal.getsignal(signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # the late second Ctrl-C: nothing happens
        time.sleep(0.1)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_run_kills_it_cleanly_and_resume_finishes_it_as_if_never_stopped(mlflow_server, tmp_path, signum):
    epochs = ["--epochs", "30", "--patience", "0", "--seed", "3"]
    process = train_process(mlflow_server, tmp_path, *epochs)
    wait_for_epoch(process, 8)
    process.send_signal(signum)
    if signum == signal.SIGINT:  # an impatient second Ctrl-C during the clean-up
        time.sleep(0.3)
        process.send_signal(signum)
    out, err = finish(process, 120)
    assert process.returncode == 128 + signum, err
    found = re.search(r"run (\w+) stopped by (SIG\w+) after epoch (\d+) of 30 \(KILLED\); resume it with: (.+)", err)
    assert found, err
    run_id, saved = found.group(1), int(found.group(3))
    assert found.group(2) == signal.Signals(signum).name and saved >= 8
    assert "Traceback" not in err

    mlflow.set_tracking_uri(mlflow_server)
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags[tag.END_REASON] == f"stopped by {signal.Signals(signum).name}"
    assert (tmp_path / "checkpoints" / run_id / "last.pt").is_file()
    assert "checkpoint" in [a.path for a in client.list_artifacts(run_id)]
    assert len(history(client, run_id, names.VAL_LOSS)) >= saved  # every finished epoch's metrics arrived

    command = found.group(4).split()
    assert command[:4] == ["aetrack", "train", "--resume", run_id]
    resumed = subprocess.run([*aetrack_command(), *command[1:], "--quiet"], capture_output=True, text=True, cwd=tmp_path,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tag.RESUMED] == str(saved)
    val_steps = history(client, run_id, names.VAL_LOSS)
    assert len(val_steps) == 30 == len(set(val_steps))  # one point per epoch, no gap, no duplicate
    train_steps = history(client, run_id, "per_step/loss")
    assert len(train_steps) == len(set(train_steps))
    assert not (tmp_path / "checkpoints" / run_id).exists()  # a finished run's checkpoint is removed
    if signum != signal.SIGTERM:
        return  # the comparison with a run never stopped: once is enough

    whole = subprocess.run([*aetrack_command(), "train", "--hidden", "32", "--latent-dim", "2", "--no-register", "--quiet",
                            "--tracking-uri", mlflow_server, "--experiment", "reliability", *epochs],
                           capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert whole.returncode == 0, whole.stderr
    whole_id = re.search(r"run id:\s+(\w+)", whole.stdout).group(1)
    assert client.get_run(whole_id).data.metrics[names.BEST_VAL_LOSS] == run.data.metrics[names.BEST_VAL_LOSS]
    assert [m.value for m in client.get_metric_history(whole_id, names.VAL_LOSS)] == \
        [m.value for m in sorted(client.get_metric_history(run_id, names.VAL_LOSS), key=lambda m: m.step)]


def test_a_run_whose_process_died_is_closed_by_the_next_command(mlflow_server, tmp_path):
    process = train_process(mlflow_server, tmp_path, "--epochs", "30")
    wait_for_epoch(process, 4)
    process.kill()  # SIGKILL: nothing can close the run from inside
    finish(process)
    mlflow.set_tracking_uri(mlflow_server)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("reliability")
    dead = [r for r in client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
            if r.data.tags.get(tag.PID) == str(process.pid)]
    assert len(dead) == 1
    nxt = train_process(mlflow_server, tmp_path, "--epochs", "1", "--quiet")
    out, err = finish(nxt)
    assert nxt.returncode == 0, err
    assert f"closed run {dead[0].info.run_id} as FAILED" in err
    run = client.get_run(dead[0].info.run_id)
    assert run.info.status == "FAILED"
    assert f"process {process.pid}" in run.data.tags[tag.END_REASON]
    # and the killed run still resumes from its local checkpoint
    resumed = subprocess.run([*aetrack_command(), "train", "--resume", dead[0].info.run_id, "--tracking-uri", mlflow_server,
                              "--quiet"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert client.get_run(dead[0].info.run_id).info.status == "FINISHED"


def test_a_diverging_run_never_stays_running_and_keeps_a_model(mlflow_server, tmp_path):
    process = train_process(mlflow_server, tmp_path, "--model", "vae", "--likelihood", "gaussian", "--lr", "10",
                            "--epochs", "3", "--latent-dim", "16", "--quiet")
    out, err = finish(process)
    assert "Traceback" not in err
    mlflow.set_tracking_uri(mlflow_server)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("reliability")
    run = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert run.info.status in ("FINISHED", "FAILED")
    models = mlflow.search_logged_models(experiment_ids=[experiment.experiment_id], output_format="list")
    assert any(m.source_run_id == run.info.run_id for m in models)


def test_a_server_stopped_and_restarted_mid_run_loses_nothing(tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    port = free_port()
    url, server = start_mlflow_server(root, port=port)
    try:
        process = train_process(url, tmp_path, "--epochs", "80", "--patience", "0", "--log-every", "5")
        wait_for_epoch(process, 4)
        stop(server)
        time.sleep(8)
        url, server = start_mlflow_server(root, port=port)
        out, err = finish(process, 600)
        assert process.returncode == 0, err
        assert "training goes on and logging waits for it" in err, err
        assert "answers again" in err and "logging caught up" in err, err
        mlflow.set_tracking_uri(url)
        client = mlflow.MlflowClient()
        run_id = re.search(r"run id:\s+(\w+)", out).group(1)
        assert client.get_run(run_id).info.status == "FINISHED"
        val_steps = history(client, run_id, names.VAL_LOSS)
        assert len(val_steps) == 80 == len(set(val_steps))
        per_epoch = 11  # digits: 1294 training examples, batch 128
        expected = sorted({s for s in range(1, 80 * per_epoch + 1) if s % 5 == 0 or s % per_epoch == 0})
        assert history(client, run_id, "per_step/loss") == expected
    finally:
        stop(server)


@pytest.mark.slow
def test_a_picture_that_fails_is_a_warning_on_a_finished_run_with_its_model(tmp_path, monkeypatch):
    from aetrack import images
    from aetrack.tracking.run import TrackingOptions, train_tracked

    def broken(*args, **kwargs):
        raise ValueError("the plotting library fell over")

    monkeypatch.setattr(images, "latent_plots", broken)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/pictures.db")
    config = TrainConfig(model="ae", hidden=(32,), latent_dim=4, epochs=2)
    result = train_tracked(config, datasets.load_for(config), TrackingOptions(experiment="pictures",
                           checkpoint_dir=str(tmp_path / "ck")), progress=False)
    run = mlflow.MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert "the plotting library fell over" in run.data.tags[tag.WARNINGS]
    # Its model is the one it kept: logged, it loads and gives the validation loss the run recorded as its best.
    from aetrack.tracking.artifacts import load_logged

    logged = load_logged(result.logged_model_uri)
    assert logged.run_id == result.run_id
    data = datasets.load_for(config)
    with torch.no_grad():
        val_loss = training.evaluate_loss(logged.model, data.val_x, data.val_y, 512)["loss"]
    assert val_loss == pytest.approx(result.history.best_val_loss, rel=1e-5)
    assert val_loss == pytest.approx(run.data.metrics[names.BEST_VAL_LOSS], rel=1e-5)


def test_a_stop_before_the_first_epoch_offers_no_resume_that_would_fail(tmp_path, monkeypatch):
    from aetrack.tracking import run as tracked
    from aetrack.tracking.lifecycle import Interrupted

    def stopped_at_once(*args, **kwargs):
        raise Interrupted(signal.SIGTERM)  # as a SIGTERM during the first epoch does

    monkeypatch.setattr(tracked, "fit", stopped_at_once)
    uri = f"sqlite:///{tmp_path}/store.db"
    result = CliRunner().invoke(main, ["train", "--tracking-uri", uri, "--epochs", "3", "--hidden", "16", "--latent-dim",
                                       "2", "--no-register", "--quiet", "--checkpoint-dir", str(tmp_path / "ck")])
    assert result.exit_code == 128 + signal.SIGTERM, result.output
    assert "resume it with" not in result.output and "--resume" not in result.output
    assert "no checkpoint to resume from: run the same command again" in result.output
    run = mlflow.MlflowClient(uri).search_runs([mlflow.MlflowClient(uri).get_experiment_by_name("aetrack").experiment_id])[0]
    assert run.info.status == "KILLED"


@pytest.mark.slow
def test_runs_that_picked_the_same_name_at_once_end_with_distinct_names(tmp_path):
    from aetrack.tracking import describe
    from aetrack.tracking.lifecycle import claim_run_name

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/store.db")
    experiment_id = client.create_experiment("names")
    config = TrainConfig(hidden=(16,), latent_dim=2)
    base = describe.run_name(config, client, experiment_id)
    # What three processes started together did: each looked before any of them had created its run.
    runs = [client.create_run(experiment_id, run_name=base, start_time=1000 + i) for i in range(3)]
    names_kept = [claim_run_name(client, run, lambda: describe.run_name(config, client, experiment_id))
                  for run in reversed(runs)]  # the last started looks first
    stored = [client.get_run(run.info.run_id).info.run_name for run in runs]
    assert stored == list(reversed(names_kept))
    assert len(set(stored)) == 3 and stored[0] == base  # the first started keeps the name


@pytest.mark.slow
def test_a_training_run_that_raced_for_a_name_moves_to_the_next(tmp_path, monkeypatch):
    from aetrack.tracking import run as tracked

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/race.db")
    config = TrainConfig(model="ae", hidden=(16,), latent_dim=2, epochs=1)
    options = tracked.TrackingOptions(experiment="race", register=False, checkpoint_dir=str(tmp_path / "ck"))
    first = tracked.train_tracked(config, datasets.load_for(config), options, progress=False)
    taken = mlflow.MlflowClient().get_run(first.run_id).info.run_name
    # The second process looked before the first run existed: it picked the same name.
    monkeypatch.setattr(tracked, "pick_run_name", lambda *args: taken)
    second = tracked.train_tracked(config, datasets.load_for(config), options, progress=False)
    assert mlflow.MlflowClient().get_run(second.run_id).info.run_name == f"{taken}-2"
    assert mlflow.MlflowClient().get_run(first.run_id).info.run_name == taken


@pytest.mark.slow
def test_a_run_without_a_heartbeat_for_too_long_is_closed_from_any_host(tmp_path):
    from aetrack.tracking import lifecycle

    uri = f"sqlite:///{tmp_path}/store.db"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment("pods")
    now = time.time()
    silent = lifecycle.STALE_AFTER + 60
    made = {}
    for label, beat in (("gone", now - silent), ("alive", now - 30), ("old aetrack", None)):
        tags = {tag.HOST: "pod-that-never-returns", tag.PID: "7"} | ({tag.HEARTBEAT: str(int(beat))} if beat else {})
        made[label] = client.create_run(experiment_id, tags=tags).info.run_id
    said = []
    closed = lifecycle.close_dead_runs(experiment_id, said.append, now=now)
    assert closed == [made["gone"]]
    gone = client.get_run(made["gone"])
    assert gone.info.status == "FAILED"
    assert "no heartbeat from process 7 on pod-that-never-returns" in gone.data.tags[tag.END_REASON]
    assert client.get_run(made["alive"]).info.status == "RUNNING" == client.get_run(made["old aetrack"]).info.status
    assert said == [f"closed run {made['gone']} as FAILED: no heartbeat from pod-that-never-returns for "
                    f"{silent / 60:.0f} min"]


@pytest.mark.slow
def test_compare_evaluate_and_tune_close_a_silent_run_of_their_experiment(tmp_path):
    """Not only `train`: every command that works on an experiment closes its runs whose heartbeat stopped."""
    from click.testing import CliRunner

    from aetrack.cli import main
    from aetrack.evaluation import Settings
    from aetrack.tracking.reports import compare
    from aetrack.tracking import lifecycle
    from aetrack.tracking.workflows.evaluate import evaluate_run
    from aetrack.tracking.run import TrackingOptions, train_tracked

    uri = f"sqlite:///{tmp_path}/pods.db"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    config = TrainConfig(model="ae", hidden=(16,), latent_dim=2, epochs=1)
    trained = train_tracked(config, datasets.load_for(config), TrackingOptions(
        experiment="pods", register=False, checkpoint_dir=str(tmp_path / "ck")), progress=False)

    def silent_run() -> str:
        old = str(int(time.time() - lifecycle.STALE_AFTER - 60))
        return client.create_run(trained.experiment_id, tags={tag.HOST: "pod-that-never-returns", tag.PID: "7",
                                                               tag.HEARTBEAT: old}).info.run_id

    def status(run_id: str) -> str:
        return client.get_run(run_id).info.status

    gone = silent_run()
    compare.select_runs(client, "pods", echo=lambda _: None)
    assert status(gone) == "FAILED"
    gone = silent_run()
    evaluate_run(trained.run_id, Settings(iw_samples=2, nll_images=16, samples=64), use_reference=False,
                 echo=lambda _: None)
    assert status(gone) == "FAILED"
    gone = silent_run()
    result = CliRunner().invoke(main, ["tune", "--model", "ae", "--hidden", "16", "--latent-dim", "2", "--epochs", "1",
                                       "--n-trials", "1", "--param", "lr=float:1e-3:2e-3", "--no-register",
                                       "--experiment", "pods", "--tracking-uri", uri,
                                       "--storage", f"sqlite:///{tmp_path}/optuna.db"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert status(gone) == "FAILED" and f"closed run {gone} as FAILED" in result.output


@pytest.mark.slow
def test_a_training_run_records_its_heartbeat(tmp_path):
    from aetrack.tracking.run import TrackingOptions, train_tracked

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/beat.db")
    config = TrainConfig(model="ae", hidden=(16,), latent_dim=2, epochs=1)
    before = time.time()
    result = train_tracked(config, datasets.load_for(config), TrackingOptions(
        experiment="beat", register=False, checkpoint_dir=str(tmp_path / "ck")), progress=False)
    beat = mlflow.MlflowClient().get_run(result.run_id).data.tags[tag.HEARTBEAT]
    assert before - 1 <= int(beat) <= time.time()


def descendants(pid: int) -> list[int]:
    """`pid` and every process under it (the mlflow server and the uvicorn workers it started)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        found.append(parent)
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    todo.append(int(stat.parent.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def last_picture(client, run_id: str) -> int:
    return max((step for _, step in pictures.logged_pictures(client, run_id)), default=-1)


def wait_for_checkpoint(path: Path, run_id: str, epoch: int, timeout: float = 120) -> int:
    """The epoch of the checkpoint at `path` once it is at least `epoch` (checkpoints come every CHECKPOINT_SECONDS)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and (saved := checkpoints.load(path, run_id)["epoch"]) >= epoch:
            return saved
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of epoch {epoch} or later at {path} after {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("server, epochs", [("behind", 300), ("ahead", 1000)])
def test_a_sigkill_while_logging_is_behind_leaves_no_gap_after_resume(tmp_path, server, epochs):
    """A SIGKILL loses the epochs after the last checkpoint (at most CHECKPOINT_SECONDS of them): the resumed run trains
    them again. Whether the server lacked checkpointed epochs (it hung: the journal has them) or already had epochs
    past the checkpoint (logging runs ahead of checkpoints), every epoch ends on the server exactly once."""
    root = tmp_path / "server"
    root.mkdir()
    url, server_process = start_mlflow_server(root)
    # At 10-50 ms an epoch, a checkpoint comes every 100-500 epochs: "ahead" needs the server to pass one before
    # the run ends, and a checkpoint may come between a look at the server and the kill.
    paused = []
    try:
        process = train_process(url, tmp_path, "--epochs", str(epochs), "--patience", "0", "--seed", "5")
        wait_for_epoch(process, epochs // 50)  # a line every epochs // 50 epochs
        mlflow.set_tracking_uri(url)
        client = mlflow.MlflowClient()
        experiment = client.get_experiment_by_name("reliability")
        run_id = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"],
                                    max_results=1)[0].info.run_id
        if server == "behind":
            paused = descendants(server_process.pid)
            for pid in paused:  # the server hangs: the queue falls behind while training goes on and checkpoints
                os.kill(pid, signal.SIGSTOP)
        checkpoint = tmp_path / "checkpoints" / run_id / "last.pt"
        saved = wait_for_checkpoint(checkpoint, run_id, 14)
        if server == "behind":
            time.sleep(0.5)  # epochs past the checkpoint, which the kill loses
        else:
            while True:
                assert process.poll() is None, "the run ended before the server had an epoch past a checkpoint"
                if (len(history(client, run_id, names.VAL_LOSS)) > saved
                        and last_picture(client, run_id) > saved
                        and checkpoints.load(checkpoint, run_id)["epoch"] == saved):  # and no checkpoint came since
                    break
                saved = wait_for_checkpoint(checkpoint, run_id, saved)
        process.kill()  # SIGKILL: nothing in the process gets to flush anything
        finish(process)
        for pid in paused:
            os.kill(pid, signal.SIGCONT)
        paused = []
        saved = checkpoints.load(tmp_path / "checkpoints" / run_id / "last.pt", run_id)["epoch"]
        on_server = history(client, run_id, names.VAL_LOSS)
        if server == "behind":
            assert saved >= 14 and len(on_server) < saved  # the kill came while the server lacked checkpointed epochs
        else:  # the server has epochs, and pictures of epochs, that no checkpoint holds
            assert len(on_server) > saved and last_picture(client, run_id) > saved

        resumed = subprocess.run([*aetrack_command(), "train", "--resume", run_id, "--tracking-uri", url, "--quiet"],
                                 capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        assert "closed run" not in resumed.stderr or run_id in resumed.stderr
        assert client.get_run(run_id).info.status == "FINISHED"
        val_steps = history(client, run_id, names.VAL_LOSS)
        assert val_steps == list(range(1, epochs + 1))  # every epoch exactly once
        train_steps = history(client, run_id, names.logged("train_loss"))
        assert len(train_steps) == len(set(train_steps))
        per_epoch = 11  # digits: 1294 training examples, batch 128, a point every 20 steps and at each epoch's end
        if server == "ahead":  # every epoch's pictures exactly once, those the kill left on the server included
            steps = [step for key, step in pictures.logged_pictures(client, run_id) if key == "progress/samples"]
            best = int(client.get_run(run_id).data.metrics[names.BEST_EPOCH])  # its pictures come at the end
            assert sorted(steps) == sorted({0, best} | image_epochs(epochs))
        assert train_steps == sorted({s for s in range(1, epochs * per_epoch + 1) if s % 20 == 0 or s % per_epoch == 0})
    finally:
        for pid in paused:
            os.kill(pid, signal.SIGCONT)
        stop(server_process)


@pytest.mark.slow
def test_a_new_local_store_is_copied_not_migrated_and_holds_what_mlflow_would_have_written(tmp_path, monkeypatch):
    """MLflow migrates every new sqlite store (~2 s); aetrack copies an empty store that MLflow migrated once."""
    import sqlite3

    import mlflow.store.db.utils as db_utils

    from aetrack.cli.options import use_tracking_uri

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # the Default experiment's artifact folder is MLflow's, relative to here
    previous = mlflow.get_tracking_uri()
    migrations = []
    upgrade = db_utils._upgrade_db
    monkeypatch.setattr(db_utils, "_upgrade_db", lambda engine: (migrations.append(engine), upgrade(engine)))

    def dump(uri: str) -> list[str]:
        mlflow.set_tracking_uri(uri)
        mlflow.MlflowClient().search_experiments()
        with sqlite3.connect(uri[len("sqlite:///"):]) as db:
            lines = list(db.iterdump())
        # One row differs by nature, the Default experiment's creation time; statements, and a table's constraints,
        # come in no fixed order (MLflow's own stores differ so from one another).
        return sorted(str(sorted(part.strip(" ,") for part in re.sub(
            r"'Default','([^']*)','active',\d+,\d+", r"'Default','\1','active',T,T", line).split("\n")))
            for line in lines)

    try:
        by_mlflow = dump(f"sqlite:///{tmp_path / 'plain.db'}")  # MLflow alone (no aetrack command set it up)
        use_tracking_uri(f"sqlite:///{tmp_path / 'first.db'}")  # builds the cached empty store once
        migrations.clear()
        use_tracking_uri(f"sqlite:///{tmp_path / 'second.db'}")
        by_aetrack = dump(f"sqlite:///{tmp_path / 'second.db'}")
        assert migrations == []  # a second new store costs a file copy, no migration
        assert by_aetrack == by_mlflow
    finally:
        mlflow.set_tracking_uri(previous)
