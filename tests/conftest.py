"""Shared fixtures: real services on loopback, started here and torn down after."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

# One torch thread per process: tests start servers and worker processes beside the test process,
# and on two cores more threads than cores make everything crawl. Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, process: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before answering {url}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"nothing answered {url} within {timeout:.0f}s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    """No test writes to the user's MLflow store or ./checkpoints by accident."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/default-mlflow.db")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.chdir(tmp_path)


def start_mlflow_server(root: Path, backend_uri: str | None = None, port: int | None = None) -> tuple[str, subprocess.Popen]:
    """`mlflow server` on a loopback port (a free one by default), storing runs in `backend_uri` (SQLite in `root`
    by default)."""
    port = port or free_port()
    backend_uri = backend_uri or f"sqlite:///{root}/server.db"
    log = open(root / f"mlflow-server-{port}.log", "w")
    process = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", backend_uri,
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=root,
        # MLflow's job runner (seven processes for GenAI scorers) would only compete with the tests for the cores.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", process)
    except Exception:
        stop(process)
        raise RuntimeError((root / f"mlflow-server-{port}.log").read_text()[-2000:])
    return url, process


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` process on loopback, shared by the session; yields its URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    url, process = start_mlflow_server(root)
    yield url
    stop(process)


POSTGRES_URL = os.environ.get("AETRACK_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")


@pytest.fixture
def postgres_url():
    """A fresh PostgreSQL database for one test, dropped after; skips where no server runs
    (fails instead when AETRACK_REQUIRE_POSTGRES=1)."""
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(f"{POSTGRES_URL}/postgres", connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as err:
        if os.environ.get("AETRACK_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required (AETRACK_REQUIRE_POSTGRES=1) but not reachable: {err}")
        pytest.skip(f"no PostgreSQL at {POSTGRES_URL}")
    name = f"aetrack_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    yield f"{POSTGRES_URL}/{name}"
    with admin.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def aetrack_command() -> list[str]:
    """The installed console script, run as a real process."""
    return [shutil.which("aetrack", path=str(VENV_BIN)) or str(VENV_BIN / "aetrack")]


STAND_IN_M1 = "runs:/stand-in/vae"  # what a stacked variant's `--features` names in tests that give it `stand_in_m1`


def stand_in_m1(data, arch: str = "mlp", hidden: tuple[int, ...] = (16,), dataset: str = "digits"):
    """`load` for a stacked variant (M1+M2) in tests: an untrained VAE of `data`'s images standing in for a logged
    one, its means and its decoder scaled up so that its codes vary with the image and its images with the code.
    Each call of the loader gives a copy, as each load of a logged model does."""
    import copy

    from aetrack.config import TrainConfig
    from aetrack.models import build_model

    config = TrainConfig(model="vae", dataset=dataset, arch=arch, hidden=hidden, latent_dim=6)
    m1 = build_model(config, data.shape, data.num_classes)
    with torch.no_grad():
        m1.body.encoder.head.weight[:config.latent_dim].mul_(20)
        for weight in m1.body.decoder.parameters():
            weight.mul_(3)
    meta = {"params": config.to_params(), "shape": list(data.shape), "classes": list(data.classes), "source": STAND_IN_M1}
    return lambda target: (copy.deepcopy(m1), meta)
