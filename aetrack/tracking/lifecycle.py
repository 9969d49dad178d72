"""A training run's life with the tracking server: is the server there, which process owns a RUNNING run, runs
that a dead process left RUNNING, stopping on SIGINT/SIGTERM, and logging that waits out a server's absence."""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import mlflow
from mlflow.entities import Metric

from aetrack.config import UserError
from aetrack.tracking import metric_names as names
from aetrack.tracking.pictures import log_picture
from aetrack.tracking import tags as tag

# A server that does not answer at start is an error within this many seconds (MLflow alone retries for ~250 s).
PROBE_SECONDS = 12.0


def check_server(uri: str, seconds: float = PROBE_SECONDS) -> None:
    """Raise UserError (one line, naming `uri`) unless an http(s) tracking server answers within `seconds`.
    Any HTTP answer counts (a login server's 401 too); other URIs (files, databases) are not probed."""
    if not uri.startswith(("http://", "https://")):
        return
    deadline, reason = time.monotonic() + seconds, "no answer"
    while True:
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=min(5.0, seconds)):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except (urllib.error.URLError, OSError) as err:
            reason = str(getattr(err, "reason", err)) or type(err).__name__
        if time.monotonic() >= deadline:
            raise UserError(f"the tracking server {uri} does not answer ({reason}) after {seconds:.0f} s: "
                            "start it, or point --tracking-uri / MLFLOW_TRACKING_URI at one that runs")
        time.sleep(1.0)


# ----- which process owns a run --------------------------------------------------------------------------------

def _started(pid: int) -> str:
    """The process's start time in clock ticks since boot ('' where /proc is missing): a pid can be reused."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def owner_tags() -> dict[str, str]:
    pid = os.getpid()
    return {tag.HOST: socket.gethostname(), tag.PID: str(pid), tag.PID_STARTED: _started(pid)}


def owner_alive(tags: dict[str, str]) -> bool | None:
    """Whether the process that owns a run still lives: None when it ran on another host (cannot tell)."""
    if tags.get(tag.HOST) != socket.gethostname() or not tags.get(tag.PID, "").isdigit():
        return None
    pid = int(tags[tag.PID])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    return tags.get(tag.PID_STARTED, "") == _started(pid)


# A running job's MetricBuffer writes the HEARTBEAT tag at most this often (whenever training logs); a RUNNING run whose
# heartbeat is older than STALE_AFTER is dead, whatever host it ran on (a pod that never returns), and is closed.
HEARTBEAT_SECONDS = 60
BATCH_SECONDS = 1.0  # epoch metrics wait at most this long for the next epoch's to join them
STALE_AFTER = 15 * 60


def close_dead_runs(experiment_id: str, echo: Callable[[str], None] = print, now: float | None = None) -> list[str]:
    """Mark FAILED every RUNNING run of this experiment whose aetrack process is gone: on this host, a process that
    no longer exists (killed, crashed); on any host, a heartbeat older than STALE_AFTER. A tag says why; returns
    their ids."""
    client = mlflow.MlflowClient()
    host, now = socket.gethostname(), time.time() if now is None else now
    runs = client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
    closed = []
    for run in runs:
        tags, when = run.data.tags, time.strftime('%Y-%m-%d %H:%M:%S')
        beat = tags.get(tag.HEARTBEAT, "")
        silent = now - int(beat) if beat.isdigit() else None
        if tags.get(tag.HOST) == host and owner_alive(tags) is False:
            reason = (f"process {tags[tag.PID]} on {host} ended without closing the run (killed or crashed); "
                      f"closed by a later aetrack command at {when}")
            said = f"its process {tags[tag.PID]} is gone"
        elif silent is not None and silent > STALE_AFTER:
            reason = (f"no heartbeat from process {tags.get(tag.PID, '?')} on {tags.get(tag.HOST, '?')} for "
                      f"{silent / 60:.0f} min (the limit is {STALE_AFTER // 60} min); closed by a later aetrack command "
                      f"on {host} at {when}")
            said = f"no heartbeat from {tags.get(tag.HOST, '?')} for {silent / 60:.0f} min"
        else:
            continue
        client.set_tag(run.info.run_id, tag.END_REASON, reason)
        client.set_terminated(run.info.run_id, "FAILED")
        echo(f"closed run {run.info.run_id} as FAILED: {said}")
        closed.append(run.info.run_id)
    return closed


def claim_run_name(client, run, next_name: Callable[[], str], tries: int = 10) -> str:
    """Two runs started at once can pick the same free name (each looks before either exists). After its run exists,
    each process looks again: of runs sharing a name, the first started keeps it, unless it took the name after a
    clash, and the others move to `next_name()` and look again. Returns the name the run ends with."""
    name, moved = run.info.run_name, False
    for attempt in range(tries + 1):
        plain = name.replace("'", "")  # a quote would end the filter's string
        same = client.search_runs([run.info.experiment_id], f"attributes.run_name = '{plain}'", max_results=100)
        others = [r for r in same if r.info.run_id != run.info.run_id]
        first = min(same or [run], key=lambda r: (r.info.start_time, r.info.run_id))
        if not others or (not moved and first.info.run_id == run.info.run_id):
            return name
        name, moved = next_name() if attempt < tries else f"{name}-{run.info.run_id[:6]}", True
        client.set_tag(run.info.run_id, "mlflow.runName", name)
    return name


# ----- signals ---------------------------------------------------------------------------------------------------

class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: the run stops as KILLED."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _handling(handle):
    """SIGINT and SIGTERM go to `handle` inside the block; outside the main thread nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _still_closing(echo: Callable[[str], None]):
    return lambda signum, frame: echo(f"{signal.Signals(signum).name} again: still closing the run, one moment")


@contextlib.contextmanager
def stop_on_signals(echo: Callable[[str], None] = print):
    """Inside: the first SIGINT or SIGTERM raises Interrupted; later ones, while the run is being closed, only say
    so (a second Ctrl-C must not leave a half-closed run). After a stop, the process is on its way out with the
    stop's exit status: a repeated signal is then ignored, where restoring Python's handler let a late second
    Ctrl-C turn the exit status 130 into death by SIGINT (seen once in CI, under load)."""
    again = _still_closing(echo)
    stopping = False

    def handle(signum, frame):
        nonlocal stopping
        if stopping:
            return again(signum, frame)
        stopping = True
        raise Interrupted(signum)

    try:
        with _handling(handle):
            yield
    finally:
        if stopping and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def closing(echo: Callable[[str], None] = print):
    """Inside: SIGINT and SIGTERM only say that the run is being closed (closing must finish once begun)."""
    with _handling(_still_closing(echo)):
        yield


# ----- logging that waits out the server -------------------------------------------------------------------------

def until_done(call: Callable, *, on_failure: Callable[[Exception], object],
               retry: Callable[[Exception], bool] = lambda err: True):
    """`call()` until it goes through, 1, 2, 4 ... at most 10 s apart, telling `on_failure` of each failed try; an
    error that `retry` refuses is raised. A signal (KeyboardInterrupt) is never caught."""
    delay = 1.0
    while True:
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - what to retry is `retry`'s to say
            if not retry(err):
                raise
            on_failure(err)
            time.sleep(delay)
            delay = min(2 * delay, 10.0)


class MetricBuffer:
    """What a run logs while it trains: step metrics, gathered into one batch per epoch or per BATCH_SECONDS,
    whichever is longer (or per `limit` values), and pictures, sent in order by one background thread, so that training never waits for the server.

    A request that fails (the server is away) is retried until it goes through; a line says that logging is
    waiting, and another when it has caught up. A metric keeps the timestamp of its first attempt, so a retried
    batch that had in fact arrived is an exact duplicate, which MLflow's store drops. On `--resume`, `skip` holds
    each key's last logged step: the steps the resumed run computes again are not logged twice.

    With `journal` (a file beside the checkpoint), every point is also appended there before the training loop goes
    on, and so before the epoch's checkpoint is written: after a SIGKILL, while the queue was behind the server, the
    resumed run sends from it what the server never got (`recovery.send_unsent`). Every HEARTBEAT_SECONDS at most,
    while training logs, the run's HEARTBEAT tag is queued too."""

    def __init__(self, run_id: str, *, limit: int = 900, skip: dict[str, int] | None = None,
                 echo: Callable[[str], None] = print, warn_after: float = 10.0,  # MLflow takes <= 1000 metrics a batch
                 journal: Path | None = None):
        self.run_id, self.limit, self.skip, self.echo, self.warn_after = run_id, limit, skip or {}, echo, warn_after
        self.journal, self.next_beat, self.batched_at = journal, 0.0, -math.inf
        if journal is not None:
            journal.parent.mkdir(parents=True, exist_ok=True)
        self.client = mlflow.MlflowClient()
        self.pending: list[Metric] = []
        self.sent = self.pictures = 0
        self.items: queue.Queue = queue.Queue()
        self.busy_since: float | None = None
        self.current: tuple | None = None
        self.waiting = self.recovering = False
        self.thread = threading.Thread(target=self._work, name="aetrack-logging", daemon=True)
        self.thread.start()

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        """The training loop's keys under their MLflow names (`metric_names.logged`); epoch-level metrics (those
        that come with their `epoch`) take the epoch as step, batch-level ones the optimiser step."""
        now = int(time.time() * 1000)
        epoch_level = names.EPOCH in metrics
        if epoch_level:
            step = int(metrics[names.EPOCH])
        fresh = []
        for key, value in metrics.items():
            name = names.logged(key)
            if key != names.EPOCH and step > self.skip.get(name, -1):
                fresh.append(Metric(name, float(value), now, step))
        self.pending += fresh
        if self.journal is not None and fresh:  # one write, closed: in the kernel's hands before training goes on
            with open(self.journal, "a", encoding="utf-8") as file:
                file.write("".join(json.dumps([m.key, m.value, m.timestamp, m.step, epoch_level]) + "\n" for m in fresh))
        if time.monotonic() >= self.next_beat:
            self.next_beat = time.monotonic() + HEARTBEAT_SECONDS
            beat = str(int(time.time()))
            self.items.put(("heartbeat", lambda: self.client.set_tag(self.run_id, tag.HEARTBEAT, beat), []))
        # Epoch-end metrics close a batch once BATCH_SECONDS have passed since the last: the UI is never more than an
        # epoch or a second behind, and short epochs share a request (a sqlite store's log_batch holds the
        # interpreter for ~13 ms, a fifth of a digits epoch; 17 epochs at once cost 2.7 ms each).
        if len(self.pending) >= self.limit or (epoch_level and time.monotonic() - self.batched_at >= BATCH_SECONDS):
            self.flush(wait=False)
        self._check_waiting()

    def image(self, picture, key: str, step: int) -> None:
        """`picture` (PIL), or a call that makes it: made in this buffer's thread, once, beside training; one that
        fails to be made is a warning, not a request retried for ever."""
        self.flush(wait=False)  # keep the order: metrics logged before the picture go first
        mark, self.pictures = not self.pictures, self.pictures + 1
        made = [] if callable(picture) else [picture]

        def send() -> None:
            if not made:
                try:
                    made.append(picture())
                except Exception as err:  # noqa: BLE001 - a picture that cannot be drawn must not stop logging
                    made.append(None)
                    self.echo(f"warning: the picture {key} at step {step} could not be drawn: {type(err).__name__}: {err}")
            if made[0] is not None:
                log_picture(self.client, self.run_id, made[0], key, step, mark=mark)

        self.items.put((f"picture {key}", send, []))
        self._check_waiting()

    def flush(self, wait: bool = True, timeout: float | None = None) -> bool:
        """Queue what is gathered; with `wait`, block until everything queued has reached the server (or `timeout`
        seconds passed: False)."""
        self.batched_at = time.monotonic()
        if self.pending:
            batch, self.pending = self.pending, []
            self.items.put((f"{len(batch)} metrics", lambda: self.client.log_batch(self.run_id, metrics=batch), batch))
        if not wait:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.items.unfinished_tasks:
            self._check_waiting()
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def unsent(self) -> list[Metric]:
        """The metrics not yet on the server (after a flush that timed out)."""
        left = list(self.pending)
        with self.items.mutex:
            queued = list(self.items.queue)
        return [metric for _, _, batch in ([self.current] if self.current else []) + queued for metric in batch] + left

    def _check_waiting(self) -> None:
        busy = self.busy_since
        if busy is not None and not self.waiting and time.monotonic() - busy > self.warn_after:
            self._warn("does not answer")

    def _warn(self, why: str) -> None:
        self.waiting, self.recovering = True, False
        self.echo(f"warning: the tracking server {mlflow.get_tracking_uri()} {why}; training goes on and logging "
                  f"waits for it ({self.items.qsize() + 1} requests queued)")

    def _work(self) -> None:
        while True:
            self.current = self.items.get()
            what, call, _ = self.current
            self.busy_since = time.monotonic()
            # Any failure is retried: the data must arrive.
            until_done(call, on_failure=lambda err: self.waiting or self._warn(f"failed a request ({type(err).__name__})"))
            self.busy_since, self.current = None, None
            if self.waiting:
                self.waiting, self.recovering = False, True
                self.echo(f"the tracking server answers again: sending {self.items.qsize()} queued requests")
            if self.recovering and self.items.qsize() == 0:
                self.recovering = False
                self.echo("logging caught up: everything queued reached the tracking server")
            self.items.task_done()
