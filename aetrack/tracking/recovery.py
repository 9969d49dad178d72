"""How a training run ends when it does not simply finish, and how it goes on: the exceptions that say so, the
checkpoint a stopped run is resumed from, requests that wait out an absent server, and closing a run as KILLED or
FAILED without losing what it logged. `run.train_tracked` uses them."""

from __future__ import annotations

import json
import signal
import sys
import tempfile
from pathlib import Path

import mlflow
from mlflow.entities import Metric
from tqdm.auto import tqdm

from aetrack import checkpoints
from aetrack.config import UserError
from aetrack.tracking import lifecycle
from aetrack.tracking import tags as tag
from aetrack.tracking.lifecycle import Interrupted, MetricBuffer


class RunStopped(KeyboardInterrupt):
    """A signal stopped the run; it is closed as KILLED with its checkpoint kept. `epoch` is the last saved one.
    A KeyboardInterrupt, so that it stops whatever loop called training (an Optuna study does not go on)."""

    def __init__(self, run_id: str, signum: int, epoch: int, epochs: int, status: str):
        self.run_id, self.signum, self.epoch, self.epochs, self.status = run_id, signum, epoch, epochs, status
        super().__init__(f"run {run_id} stopped by {signal.Signals(signum).name} after epoch {epoch} of {epochs} ({status})")


class RunDiverged(UserError):
    """The training loss stopped being finite; the run is FAILED, with the best model before that logged."""


def say(message: str) -> None:
    """A line on stderr that does not tear the progress bar."""
    tqdm.write(message, file=sys.stderr)


def open_checkpoint(run_id: str, checkpoint_dir: str) -> dict:
    """The checkpoint to resume `run_id` from: the local one (`<checkpoint_dir>/<run id>/last.pt`), else the copy a
    stopped run left among its artifacts. A finished run, or one whose process still runs, cannot be resumed."""
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise UserError(f"--resume {run_id}: no such run at {mlflow.get_tracking_uri()}") from None
    status = run.info.status
    if status == "FINISHED":
        raise UserError(f"--resume {run_id}: the run finished; there is nothing to resume")
    if status == "RUNNING" and lifecycle.owner_alive(run.data.tags):
        raise UserError(f"--resume {run_id}: the run is still running (process {run.data.tags[tag.PID]})")
    local = checkpoints.path_for(checkpoint_dir, run_id)
    if local.is_file():
        return checkpoints.load(local, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            copy = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT, dst_path=tmp)
        except Exception:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
            raise checkpoints.CheckpointError(f"--resume {run_id}: no checkpoint at {local}, and none among the run's "
                                              "artifacts") from None
        return checkpoints.load(Path(copy), run_id)


CHECKPOINT_ARTIFACT = f"checkpoint/{checkpoints.FILE}"  # where a stopped run leaves its checkpoint for other machines
UNSENT = "unsent-metrics.json"  # beside the local checkpoint: metrics a stopped run could not deliver
JOURNAL = "metrics.jsonl"  # beside the local checkpoint: every point the run logged, written before its checkpoint


def persist(call, what: str):
    """`call()` until it goes through: the server may be away for a while, and this must arrive. An MLflow error that
    is not the server's absence (a refused request) is raised at once."""
    warned = []

    def warn(err: Exception) -> None:
        if not warned:
            say(f"warning: the tracking server {mlflow.get_tracking_uri()} does not answer ({type(err).__name__}); "
                f"waiting to send {what}")
            warned.append(err)

    return lifecycle.until_done(call, on_failure=warn, retry=lambda err: not isinstance(
        err, mlflow.exceptions.MlflowException) or _unavailable(err))


def _unavailable(err: Exception) -> bool:
    """An MlflowException that means the server was not there (as opposed to one that refused the request)."""
    text = str(err)
    return any(mark in text for mark in ("Max retries exceeded", "Connection", "ConnectTimeout", "ReadTimeout",
                                          "503", "502", "504"))


def send_unsent(run_id: str, folder: Path, resume: dict | None = None) -> int:
    """Before a stopped run goes on: send what its process could not. The points a SIGTERM left unsent, and, from
    the journal, every point up to the checkpoint (`resume`: its epoch and optimiser step) that the server lacks,
    such as those a SIGKILL left in the queue. Points past the checkpoint are left out: the resumed run logs them
    again. Returns how many points were sent."""
    metrics = []
    file = folder / UNSENT
    if file.is_file():
        metrics += [Metric(key, value, timestamp, step) for key, value, timestamp, step in json.loads(file.read_text())]
    journal = folder / JOURNAL
    if resume is not None and journal.is_file():
        on_server = last_steps(run_id)
        for name, step in ((m.key, m.step) for m in metrics):
            on_server[name] = max(on_server.get(name, -1), step)
        latest: dict[tuple[str, int], Metric] = {}  # a step logged twice (by a run resumed before) counts once
        for line in journal.read_text(encoding="utf-8").splitlines():
            try:
                key, value, timestamp, step, epoch_level = json.loads(line)
            except ValueError:
                continue  # a line torn by the kill
            saved = resume["epoch"] if epoch_level else resume["step"]
            if on_server.get(key, -1) < step <= saved:
                latest[key, step] = Metric(key, value, timestamp, step)
        metrics += latest.values()
    client = mlflow.MlflowClient()
    for start in range(0, len(metrics), 900):
        persist(lambda: client.log_batch(run_id, metrics=metrics[start:start + 900]), "the metrics of the stopped run")
    file.unlink(missing_ok=True)
    if metrics:
        say(f"sent {len(metrics)} metric points that run {run_id} logged before it stopped and the server never got")
    return len(metrics)


def last_steps(run_id: str) -> dict[str, int]:
    """Each metric's last logged step: a resumed run does not log those steps again."""
    return {metric.key: metric.step for metric in mlflow.MlflowClient().get_run(run_id).data._metric_objs}


def close_failed(run_id: str, log: MetricBuffer | None, err: BaseException) -> None:
    """FAILED, with why, after what was logged has been sent (bounded in time: the server may be the failure)."""
    try:
        if log is not None and not log.flush(timeout=30):
            say(f"warning: {len(log.unsent())} metrics of run {run_id} could not reach the tracking server")
        reason = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
        mlflow.set_tag(tag.END_REASON, reason[:5000])
        mlflow.end_run("FAILED")
    except Exception as close_err:  # noqa: BLE001 - the run stays RUNNING; a later aetrack command closes it
        say(f"warning: could not close run {run_id} on the tracking server ({type(close_err).__name__})")


def saved_epoch(folder: Path, run_id: str) -> int:
    try:
        return int(checkpoints.load(folder / checkpoints.FILE, run_id)["epoch"])
    except checkpoints.CheckpointError:
        return 0


def close_stopped(run_id: str, folder: Path, log: MetricBuffer | None, stop: Interrupted) -> None:
    """Flush what was logged, keep the unsent part beside the checkpoint, leave a copy of the checkpoint with the
    run (another machine can resume it), mark the run KILLED. Bounded in time: `docker stop` waits 10 s."""
    delivered = log is None or log.flush(timeout=5)
    if not delivered:
        folder.mkdir(parents=True, exist_ok=True)
        unsent = [[m.key, m.value, m.timestamp, m.step] for m in log.unsent()]
        (folder / UNSENT).write_text(json.dumps(unsent))
        say(f"{len(unsent)} metrics could not reach the tracking server; they are kept in {folder / UNSENT} "
            "and sent on --resume")
        return  # the server is away: the run stays RUNNING, and a later aetrack command closes it
    client = mlflow.MlflowClient()
    try:
        if (folder / checkpoints.FILE).is_file():
            client.log_artifact(run_id, str(folder / checkpoints.FILE), artifact_path=CHECKPOINT_ARTIFACT.rsplit("/", 1)[0])
        client.set_tag(run_id, tag.END_REASON, f"stopped by {signal.Signals(stop.signum).name}")
        mlflow.end_run("KILLED")
    except Exception as err:  # noqa: BLE001 - closing is best effort; the local checkpoint is what counts
        say(f"warning: could not close run {run_id} on the tracking server ({type(err).__name__})")
