"""A server started as a child process (`mlflow server`, `mlflow models serve`): in its own process group, its
output kept for one-line errors, polled until it answers, held until Ctrl-C or SIGTERM, then stopped with every
process it started.

MLflow starts `uvicorn` and `gunicorn` from PATH, so this environment's bin folder goes first on the child's PATH:
`.venv/bin/aetrack serve` works without activating the environment.
"""

from __future__ import annotations

import collections
import errno
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from aetrack.config import ConfigError, UserError


class StartError(UserError):
    """A server that did not come up; the message names the reason in one line."""


def bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def local_url(host: str, port: int) -> str:
    """Where this machine reaches a server that listens on `host`."""
    return f"http://{bracketed({'': '127.0.0.1', '0.0.0.0': '127.0.0.1', '::': '::1'}.get(host, host))}:{port}"


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_port(host: str, port: int) -> None:
    """Fail in one line when nothing can listen on host:port, rather than after the server's start-up."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except socket.gaierror:
            raise ConfigError(f"--host {host}: no such address") from None
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} is in use (a server already running?); "
                                "choose another --port") from None
            if err.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(f"--host {host} is not an address of this machine") from None
            raise UserError(f"cannot listen on {host}:{port}: {err.strerror}") from None


def bin_folders() -> list[str]:
    """This environment's script folders: where its `mlflow` and `uvicorn` are, activated or not."""
    return list(dict.fromkeys([sysconfig.get_path("scripts"), str(Path(sys.executable).parent)]))


def environment(**changes: str | None) -> dict[str, str]:
    """os.environ with this environment's bin folders first on PATH; a None value removes the variable."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([*bin_folders(), env.get("PATH", os.defpath)])
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _die_with_parent() -> None:
    """In the child: SIGTERM when aetrack dies, even by SIGKILL, so that no server is left behind (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class StopRequest:
    """Set by the SIGINT and SIGTERM handlers. A plain flag: a lock taken inside a signal handler can deadlock."""

    asked = False

    def __call__(self, signum, frame) -> None:
        self.asked = True


class Child:
    """A server started in its own session, so that Ctrl-C reaches aetrack alone and `stop` reaches the server's
    workers too. Its output goes to `log` (if given) and the last lines are kept for error messages; with
    `echo` set, lines are also copied to stderr."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log: Path | None = None):
        self.name, self.echo = name, False
        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        self.log = open(log, "a", encoding="utf-8") if log else None
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                                        start_new_session=True, preexec_fn=_die_with_parent)
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip())
            if self.log:
                self.log.write(line)
                self.log.flush()
            if self.echo:
                sys.stderr.write(line)

    def reason(self) -> str:
        """The line of its output that says most about a failure: the last exception or error, else the last line."""
        self.pump.join(2)
        lines = [line.strip() for line in self.lines if line.strip()]
        errors = [line for line in lines if re.match(r"^([\w.]+(Error|Exception)\b|ERROR\b)", line)]
        return (errors or lines or ["it printed nothing"])[-1]

    def wait_ready(self, url: str, timeout: float, stop: StopRequest) -> bool:
        """Poll `url` until it answers 200; False when a stop was asked meanwhile."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a local address: no HTTP proxy
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if stop.asked:
                return False
            if self.process.poll() is not None:
                raise StartError(f"{self.name} exited with {self.process.returncode} before it answered: {self.reason()}"
                                 + (f" (log: {self.log.name})" if self.log else ""))
            try:
                with opener.open(url, timeout=2) as answer:
                    if answer.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        raise StartError(f"{self.name} did not answer {url} within {timeout:.0f} s; last output: {self.reason()}")

    def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM to the server (it stops its own workers), then to whatever of its group is left, then SIGKILL."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and (self.process.poll() is None or _group_alive(self.process.pid)):
                time.sleep(0.1)  # poll() reaps the leader: a zombie would keep the group alive
        if self.process.poll() is None:
            self.process.kill()
        code = self.process.wait()
        self.pump.join(2)
        if self.log:
            self.log.close()
        return code


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def run_until_stopped(child: Child, ready_url: str, timeout: float, on_ready: Callable[[], None],
                      echo: Callable[[str], None]) -> None:
    """Wait for the child to answer, call `on_ready`, then hold until Ctrl-C or SIGTERM; always stop the child."""
    stop = StopRequest()
    handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if not child.wait_ready(ready_url, timeout, stop):
            return
        on_ready()
        while not stop.asked:
            if child.process.poll() is not None:
                raise UserError(f"{child.name} stopped by itself (exit {child.process.returncode}): "
                                f"{child.reason()}" + (f" (log: {child.log.name})" if child.log else ""))
            time.sleep(0.3)
    finally:
        child.stop()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    echo(f"{child.name} stopped")
