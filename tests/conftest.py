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

import ast  # noqa: E402
import functools  # noqa: E402

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


# ----- the fast lane: `pytest -m "not slow"` -----------------------------------------------------------------
# One rule instead of a decorator on every test: a test is slow when it, or a fixture it uses, starts a process
# (a server, a worker, a browser, `aetrack` as a console script), directly or through a helper of its module or of
# a module it imports helpers from. Tests that train for long in process carry `@pytest.mark.slow` by hand.
PROCESS_MODULES = ("subprocess", "multiprocessing")
PROCESS_CALLS = {"Popen", "sync_playwright"}
TESTS = Path(__file__).parent


def _called_name(call: ast.Call) -> tuple[str, str]:
    """(root, last) of a call's dotted name: subprocess.run(...) -> ("subprocess", "run"), f(...) -> ("f", "f")."""
    func, last = call.func, None
    while isinstance(func, ast.Attribute):
        last = last or func.attr
        func = func.value
    root = func.id if isinstance(func, ast.Name) else ""
    return root, last or root


@functools.cache
def process_starters(module: str) -> frozenset[str]:
    """The top-level functions of tests/<module>.py that start a process, directly or through one another."""
    tree = ast.parse((TESTS / f"{module}.py").read_text())
    imported = {}  # a helper imported from conftest or another test module: its name here -> that module
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and (TESTS / f"{node.module}.py").is_file():
            imported.update({alias.asname or alias.name: (node.module, alias.name) for alias in node.names})
    starters = {name for name, (source, original) in imported.items()
                if source != module and original in process_starters(source)}
    calls = {node.name: {_called_name(call) for call in ast.walk(node) if isinstance(call, ast.Call)}
             for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    changed = True
    while changed:
        changed = False
        for name, called in calls.items():
            if name not in starters and any(root in PROCESS_MODULES or last in PROCESS_CALLS or root in starters
                                            for root, last in called):
                starters.add(name)
                changed = True
    return frozenset(starters)


SERVICE_FIXTURES = {"postgres_url"}  # a service this suite does not start but talks to


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = Path(item.fspath).stem
        starters = process_starters(module) | process_starters("conftest") | SERVICE_FIXTURES
        if item.originalname in starters or starters & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


PACKAGE = TESTS.parent / "aetrack"
RAN_AS_FILES: set[Path] = set()  # entry files a test ran the way they are run (`python -m`, MLflow's models from code)


def run_entry_file(path: Path, **globals_) -> dict:
    """Run an entry file of aetrack as a script, the way `python -m aetrack` or MLflow runs it (never imported)."""
    import runpy

    RAN_AS_FILES.add(Path(path).resolve())
    return runpy.run_path(str(path), init_globals=globals_, run_name="__main__")


def pytest_sessionfinish(session, exitstatus):
    """The fast lane over the whole suite still reaches every module of aetrack: once its tests have run, each one
    is imported (by a test module or by the code a fast test ran), or, for an entry file, run by a test as a
    script (`run_entry_file`). A module no test reaches fails the run."""
    config = session.config
    whole_suite = [(config.invocation_params.dir / arg).resolve() for arg in config.args] in ([], [TESTS])
    if (config.getoption("markexpr") != "not slow" or not whole_suite or config.getoption("keyword")
            or exitstatus not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED)):
        return
    modules = {".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
               for path in PACKAGE.rglob("*.py")}
    ran = {".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts) for path in RAN_AS_FILES}
    unreached = sorted(modules - set(sys.modules) - ran)
    if unreached:
        session.config.get_terminal_writer().line(f"the fast lane reached none of these modules: {', '.join(unreached)}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
