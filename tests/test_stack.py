"""The team stack: docker-compose.yml checked, then its programs started natively with its own arguments (CI has no
Docker engine); `aetrack server` with and without logins; `aetrack serve` without an activated environment; and one
tuning study shared by workers on two hosts (network namespaces this file makes, or loopback where it cannot)."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import requests
import yaml
from click.testing import CliRunner

from aetrack.cli import main
from conftest import VENV_BIN, aetrack_command, free_port, stop, wait_http

REPO = Path(__file__).resolve().parents[1]
PINS = {name.lower(): version for name, _, version in
        (line.partition("==") for line in (REPO / "constraints.txt").read_text().split() if "==" in line)}
SECRET_WORDS = re.compile(r"PASSWORD|SECRET|TOKEN|KEY")
# A tiny VAE on the embedded digits: every job of these tests takes seconds.
TINY = "--hidden 32 --latent-dim 2 --prior normal --beta 1 --batch-size 64 --log-every 10"
# A client that cannot reach its server fails in seconds, not after MLflow's 250 s of retries.
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(autouse=True)
def _forget_tracking_uri():
    """In-process commands set MLflow's global tracking URI; the next test starts without it."""
    yield
    import mlflow

    mlflow.set_tracking_uri(None)


# ---------------------------------------------------------------------------------------------- compose, as compose reads it

class MissingVariable(Exception):
    """`${NAME:?message}` with NAME unset: docker compose refuses to start and prints the message."""


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: $$, $NAME, ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error},
    ${NAME?error}, ${NAME:+other}, ${NAME+other}, nested in defaults."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            depth, end = 1, i + 2
            while depth:
                if text.startswith("${", end):
                    depth, end = depth + 1, end + 2
                    continue
                depth -= text[end] == "}"
                end += 1
            out.append(_substitute(text[i + 2:end - 1], env))
            i = end
        elif match := re.match(r"\$([A-Za-z_]\w*)", text[i:]):
            out.append(env.get(match.group(1), ""))
            i += match.end()
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _substitute(expression: str, env: dict[str, str]) -> str:
    name, operator, argument = re.fullmatch(r"([A-Za-z_]\w*)(?:(:?[-?+])(.*))?", expression, re.S).groups()
    value, is_set = env.get(name, ""), name in env
    present = bool(value) if operator and operator.startswith(":") else is_set
    if operator in (":-", "-"):
        return value if present else interpolate(argument, env)
    if operator in (":?", "?"):
        if not present:
            raise MissingVariable(f"{name}: {interpolate(argument, env)}")
        return value
    if operator in (":+", "+"):
        return interpolate(argument, env) if present else ""
    return value


def resolved(node, env: dict[str, str]):
    """Every string of the parsed file interpolated, as compose does after reading the YAML."""
    if isinstance(node, dict):
        return {key: resolved(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [resolved(value, env) for value in node]
    return interpolate(node, env) if isinstance(node, str) else node


def raw_compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def compose(**env: str) -> dict:
    return resolved(raw_compose(), {"POSTGRES_PASSWORD": "test-only", **env})


def env_example() -> dict[str, str]:
    pairs = (line.partition("=") for line in (REPO / ".env.example").read_text().splitlines()
             if line.strip() and not line.startswith("#"))
    return {key.strip(): value.strip() for key, _, value in pairs}


def native(command: str, swaps: dict[str, str]) -> list[str]:
    """A compose command with its container names, addresses and ports swapped for this machine's, its program
    taken from this environment's bin folder."""
    for old, new in swaps.items():
        command = command.replace(old, new)
    words = shlex.split(command)
    return [str(VENV_BIN / words[0]), *words[1:]]


def native_env(service: dict, swaps: dict[str, str]) -> dict[str, str]:
    """This process's environment with the service's own, its container names swapped."""
    env = {**os.environ, **CLIENT_ENV}
    for key, value in (service.get("environment") or {}).items():
        for old, new in swaps.items():
            value = value.replace(old, new)
        env[key] = value
    env.pop("AETRACK_DATA_DIR", None)  # /data in the container; the embedded digits need no files
    return env


def options(arguments: list[str]) -> dict[str, str | bool]:
    """`--name value` / `--flag` pairs of a command line."""
    parsed, key = {}, None
    for word in arguments:
        if word.startswith("--"):
            key = word
            parsed[key] = True
        elif key is not None:
            parsed[key], key = word, None
    return parsed


# ---------------------------------------------------------------------------------------------- the compose file

def test_compose_services_profiles_health_checks_and_dependencies():
    services = compose()["services"]
    assert set(services) == {"postgres", "mlflow", "train", "tune-worker", "serve", "optuna-dashboard"}
    profiles = {name: service.get("profiles") for name, service in services.items()}
    assert profiles == {"postgres": None, "mlflow": None, "train": ["train"], "tune-worker": ["tune-worker"],
                        "serve": ["serve"], "optuna-dashboard": ["optuna-dashboard"]}
    for name in ("postgres", "mlflow", "serve", "optuna-dashboard"):  # the long-running ones
        assert services[name]["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
        assert services[name]["restart"] == "unless-stopped", name
    assert "/health" in " ".join(services["mlflow"]["healthcheck"]["test"])
    assert "/ping" in " ".join(services["serve"]["healthcheck"]["test"])
    assert "-h 127.0.0.1" in services["postgres"]["healthcheck"]["test"][1]  # not the init scripts' socket-only server

    def healthy(name: str) -> set[str]:
        return {dep for dep, rule in services[name]["depends_on"].items() if rule["condition"] == "service_healthy"}

    assert healthy("mlflow") == {"postgres"} and healthy("optuna-dashboard") == {"postgres"}
    assert healthy("train") == healthy("serve") == {"mlflow"} and healthy("tune-worker") == {"mlflow", "postgres"}

    # tune-worker scales: nothing in it may be unique to one container.
    worker = services["tune-worker"]
    assert not {"container_name", "ports", "hostname"} & set(worker)
    assert "--storage postgresql://" in worker["command"] and "--n-trials" in worker["command"]

    # Named volumes for what must outlive a container; the init script is mounted where postgres runs it.
    named = set(compose()["volumes"])
    assert named == {"pgdata", "mlflow-data"}
    assert "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert "mlflow-data:/var/lib/mlflow" in services["mlflow"]["volumes"]
    assert "./docker/postgres:/docker-entrypoint-initdb.d:ro" in services["postgres"]["volumes"]
    script = REPO / "docker" / "postgres" / "10-optuna-database.sh"
    assert os.access(script, os.X_OK)
    assert "/var/lib/mlflow/artifacts" in services["mlflow"]["command"]


def test_compose_holds_no_secret_and_publishes_only_on_loopback():
    # Every password and key comes from .env: the raw value is a bare ${VARIABLE} with no default.
    for name, service in raw_compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_WORDS.search(key):
                assert re.fullmatch(r"\$\{[A-Z_]+(:-|:\?[^}]*)?\}", str(value)), f"{name}: {key}={value}"
    with pytest.raises(MissingVariable, match="POSTGRES_PASSWORD.*\\.env"):
        resolved(raw_compose(), {})  # compose refuses to start without the database password

    # The password reaches environment variables only: never a command line, a URL or an image.
    sentinel = f"sentinel-{uuid.uuid4().hex}"
    services = compose(POSTGRES_PASSWORD=sentinel, MLFLOW_AUTH="1")["services"]
    for name, service in services.items():
        carriers = {key for key, value in (service.get("environment") or {}).items() if sentinel in value}
        assert carriers <= {"POSTGRES_PASSWORD", "PGPASSWORD"}, name
        assert sentinel not in yaml.safe_dump({k: v for k, v in service.items() if k != "environment"}), name
    assert services["mlflow"]["environment"]["PGPASSWORD"] == sentinel

    # .env.example names every variable the file uses and leaves every secret empty; .env stays out of git
    # and out of the images' build context.
    example = env_example()
    used = set(re.findall(r"\$\{([A-Za-z_]\w*)", (REPO / "docker-compose.yml").read_text()))
    assert used <= set(example), used - set(example)
    assert all(value == "" for key, value in example.items() if SECRET_WORDS.search(key)), example
    assert subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO).returncode == 0
    assert ".env" not in subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    patterns = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert patterns[0] == "*" and not [p for p in patterns if p.startswith("!.env")]  # an allow-list without .env

    # Published ports: ADDRESS:PORT:PORT with a loopback address, by default and with .env.example as it is.
    for env in ({}, {**example, "POSTGRES_PASSWORD": "x"}):
        published = [port for service in compose(**env)["services"].values() for port in service.get("ports", [])]
        assert len(published) == 4
        assert all(re.fullmatch(r"127\.0\.0\.1:\d+:\d+", str(port)) for port in published), published
    # ...and the user's choice where they set one.
    assert "0.0.0.0:6000:5000" in compose(MLFLOW_PUBLISH="0.0.0.0:6000")["services"]["mlflow"]["ports"]


def test_images_pin_mlflow_and_carry_only_what_each_service_needs():
    services = compose()["services"]
    mlflow = services["mlflow"]
    assert mlflow["build"]["args"]["MLFLOW_VERSION"] == PINS["mlflow"]
    assert mlflow["image"].endswith(f":{PINS['mlflow']}")
    server_file = (REPO / mlflow["build"]["dockerfile"]).read_text()
    assert f"ARG MLFLOW_VERSION={PINS['mlflow']}" in server_file
    assert "-c /tmp/constraints.txt" in server_file and "psycopg" in server_file
    dashboard = services["optuna-dashboard"]
    assert dashboard["image"].endswith(f":{PINS['optuna-dashboard']}")
    dashboard_file = (REPO / dashboard["build"]["dockerfile"]).read_text()
    for slim in (server_file, dashboard_file):  # no torch in the service images, and of aetrack only the login check
        instructions = "\n".join(line for line in slim.splitlines() if not line.startswith("#"))
        assert "torch" not in instructions
    assert "COPY aetrack" not in dashboard_file
    copied = {source for line in server_file.splitlines() if line.startswith("COPY ")
              for source in shlex.split(line)[1:-1] if source.startswith("aetrack")}
    assert copied == {"aetrack/__init__.py", "aetrack/tracking/__init__.py", "aetrack/tracking/login.py"}

    # The aetrack image: the CPU-only torch build unless the build argument says otherwise.
    aetrack_file = (REPO / "Dockerfile").read_text()
    cpu_index = "https://download.pytorch.org/whl/cpu"
    assert f"ARG TORCH_INDEX_URL={cpu_index}" in aetrack_file
    torch_line = next(line for line in aetrack_file.splitlines() if line.startswith("RUN") and "torch" in line)
    assert '--index-url "$TORCH_INDEX_URL"' in torch_line and "-c constraints.txt" in torch_line
    assert aetrack_file.index(torch_line) < aetrack_file.index("COPY aetrack")  # torch first: the package adds no CUDA
    for name in ("train", "tune-worker", "serve"):
        assert services[name]["build"]["args"]["TORCH_INDEX_URL"] == cpu_index
        assert compose(TORCH_INDEX_URL="https://pypi.org/simple")["services"][name]["build"]["args"]["TORCH_INDEX_URL"] \
            == "https://pypi.org/simple"


def test_aetrack_server_writes_the_login_settings_of_the_compose_image():
    from aetrack.tracking.server import AUTH_SETTINGS

    import configparser

    image = configparser.ConfigParser()
    image.read(REPO / "docker" / "mlflow" / "basic_auth.ini")
    # The same settings, aetrack's authorization function included (the image carries its module); only the login
    # database's path differs.
    differ = {"database_uri"}
    assert {key: value for key, value in image["mlflow"].items() if key not in differ} == \
        {key: value for key, value in AUTH_SETTINGS.items() if key not in differ}
    assert "admin_password" not in image["mlflow"]
    assert image["mlflow"]["database_uri"].startswith("sqlite:////var/lib/mlflow/")  # on the mlflow-data volume


def image_files(dockerfile: Path, root: Path) -> dict[str, str]:
    """What a Dockerfile's COPY lines put in its image, from this checkout, under `root` at their image paths; its
    ENV, with image paths moved under `root` too."""
    env = {}
    for line in dockerfile.read_text().splitlines():
        instruction, _, rest = line.partition(" ")
        if instruction == "COPY":
            *sources, destination = shlex.split(rest)
            for source in sources:
                target = root / destination.lstrip("/")
                target = target / Path(source).name if destination.endswith("/") else target
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(REPO / source, target)
        elif instruction == "ENV":
            env |= {key: f"{root}{value}" if value.startswith("/") else value
                    for key, _, value in (pair.partition("=") for pair in shlex.split(rest))}
    return env


# ---------------------------------------------------------------------------------------------- one-line errors

@pytest.mark.parametrize("args, env, code, message", [
    (["server", "--auth"], {"MLFLOW_AUTH_ADMIN_PASSWORD": ""}, 2, "--auth needs the admin's password in $MLFLOW_AUTH_ADMIN_PASSWORD"),
    (["server", "--auth-db", "sqlite:///x.db"], {}, 2, "--auth-db needs --auth"),
    (["server", "--backend", "postgresql://postgres@127.0.0.1:1/nowhere"], {}, 1, "cannot connect to the backend"),
    (["server", "--host", "192.0.2.1"], {}, 2, "--host 192.0.2.1 is not an address of this machine"),
    (["server", "--port", "{busy}"], {}, 1, "is in use"),
    (["serve", "models:/aetrack-digits-vae@champion", "--port", "{free}"],
     {"MLFLOW_TRACKING_URI": "http://127.0.0.1:{closed}", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}, 1, "MlflowException"),
])
def test_server_and_serve_fail_in_one_line_before_starting_anything(tmp_path, args, env, code, message):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        fill = {"busy": str(busy.getsockname()[1]), "free": str(free_port()), "closed": str(free_port())}
        args = [word.format(**fill) for word in args]
        env = {key: value.format(**fill) for key, value in env.items()}
        result = CliRunner().invoke(main, [*args, *(["--root", str(tmp_path / "root")] if args[0] == "server" else [])],
                                    env=env)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == code, result.output
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.output, result.output


@pytest.mark.slow
def test_a_server_that_fails_to_start_is_one_line_naming_the_cause(tmp_path):
    result = CliRunner().invoke(main, ["server", "--root", str(tmp_path / "root"), "--port", str(free_port()),
                                       "--backend", "nosuchstore://somewhere/mlflow", "--workers", "1"])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1, result.output
    assert len(errors) == 1 and "mlflow server exited with 1 before it answered:" in errors[0], result.output
    assert "unsupported URI 'nosuchstore://somewhere/mlflow'" in errors[0] and "server.log" in errors[0]
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------- hosts

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def in_namespace(name: str | None):
    """This thread inside network namespace `name` (None: where it is); sockets made here stay in it."""
    if name is None:
        yield
        return
    here, there = os.open("/proc/thread-self/ns/net", os.O_RDONLY), os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(there, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
        try:
            yield
        finally:
            if _libc.setns(here, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(here)
        os.close(there)


class Relay:
    """TCP from (listen_ns, listen) to (target_ns, target), one thread per direction of each connection: the router
    between the test's hosts, and PostgreSQL's way out of loopback."""

    def __init__(self, listen_ns: str | None, listen: tuple[str, int], target_ns: str | None, target: tuple[str, int]):
        with in_namespace(listen_ns):
            self.listener = socket.create_server(listen)
        self.address, self.target_ns, self.target = self.listener.getsockname(), target_ns, target
        self.connections: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with in_namespace(self.target_ns):
                upstream = socket.socket()
            try:
                upstream.connect(self.target)
            except OSError:
                client.close()
                upstream.close()
                continue
            self.connections |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        for sock in (self.listener, *self.connections):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class Hosts:
    """Where the stack runs: the `server` host (PostgreSQL and the MLflow server behind one address) and two worker
    hosts. This base class is loopback: every host is this machine."""

    kind = "loopback"
    address = "127.0.0.1"
    hosts = ("server", "worker-1", "worker-2")

    def __init__(self, postgres: tuple[str, int]):
        self.postgres = postgres  # where PostgreSQL really listens (this machine's loopback)
        self.relays: list[Relay] = []

    def prefix(self, host: str) -> list[str]:
        """What runs a command on `host`."""
        return []

    def publish_postgres(self) -> tuple[str, int]:
        """PostgreSQL's address as every host sees it."""
        return self.postgres

    def reach(self, port: int) -> str:
        """A URL on which this test process reaches the server host's `port`."""
        return f"http://127.0.0.1:{port}"

    def pids(self, host: str) -> list[int]:
        return []

    def close(self) -> None:
        for relay in self.relays:
            relay.close()


class Namespaces(Hosts):
    """Three network namespaces on one bridge in the server's: 10.231.0.1 (server), .11 and .12 (workers). Their
    names derive from this checkout's path, so that set-up first removes whatever a killed run left behind."""

    kind = "namespaces"
    address = "10.231.0.1"

    def __init__(self, postgres: tuple[str, int]):
        super().__init__(postgres)
        tag = hashlib.sha1(str(REPO).encode()).hexdigest()[:6]
        self.names = {host: f"aetrack-{tag}-{host}" for host in self.hosts}
        self.close()
        try:
            for name in self.names.values():
                ip("netns", "add", name)
                ip("-n", name, "link", "set", "lo", "up")
            server = self.names["server"]
            ip("-n", server, "link", "add", "br0", "type", "bridge")
            ip("-n", server, "addr", "add", f"{self.address}/24", "dev", "br0")
            ip("-n", server, "link", "set", "br0", "up")
            for number, host in enumerate(("worker-1", "worker-2"), start=1):
                ip("link", "add", f"port{number}", "netns", server, "type", "veth", "peer", "name", "eth0",
                   "netns", self.names[host])
                ip("-n", server, "link", "set", f"port{number}", "master", "br0", "up")
                ip("-n", self.names[host], "addr", "add", f"10.231.0.{10 + number}/24", "dev", "eth0")
                ip("-n", self.names[host], "link", "set", "eth0", "up")
        except BaseException:
            self.close()
            raise

    def prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.names[host]]

    def publish_postgres(self) -> tuple[str, int]:
        self.relays.append(Relay(self.names["server"], (self.address, self.postgres[1]), None, self.postgres))
        return self.address, self.postgres[1]

    def reach(self, port: int) -> str:
        relay = Relay(None, ("127.0.0.1", 0), self.names["server"], (self.address, port))
        self.relays.append(relay)
        return f"http://127.0.0.1:{relay.address[1]}"

    def pids(self, host: str) -> list[int]:
        done = subprocess.run(["ip", "netns", "pids", self.names[host]], capture_output=True, text=True)
        return [int(pid) for pid in done.stdout.split()]

    def close(self) -> None:
        """Idempotent: stops what runs in the namespaces (processes this test started), then deletes them."""
        super().close()
        present = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
        for host, name in self.names.items():
            if name in present:
                for pid in self.pids(host):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                subprocess.run(["ip", "netns", "del", name], capture_output=True)


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        raise OSError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def namespaces_unavailable() -> str | None:
    """Why this machine cannot make network namespaces, or None."""
    if os.environ.get("AETRACK_TEST_LOOPBACK") == "1":
        return "AETRACK_TEST_LOOPBACK=1"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"aetrack-probe-{os.getpid()}"
    try:
        for step in (["netns", "add", probe], ["netns", "exec", probe, "true"]):
            done = subprocess.run(["ip", *step], capture_output=True, text=True)
            if done.returncode:
                return f"ip {' '.join(step[:2])} failed: {done.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@pytest.fixture(params=["namespaces", "loopback"])
def hosts(request, postgres_url):
    reason = namespaces_unavailable()
    if request.param == "namespaces" and reason:
        pytest.skip(f"{reason}; the loopback variant of this test runs instead")
    if request.param == "loopback" and not reason:
        pytest.skip("the namespaces variant runs the same test across hosts")
    address = re.search(r"@([^:/]+):(\d+)", postgres_url)
    postgres = (address.group(1), int(address.group(2)))
    made = Namespaces(postgres) if request.param == "namespaces" else Hosts(postgres)
    yield made
    made.close()


# ---------------------------------------------------------------------------------------------- processes

def start(command: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=cwd)


def wait_for_line(log: Path, pattern: str, process: subprocess.Popen, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if match := re.search(pattern, log.read_text(), re.MULTILINE):
            return match
        if process.poll() is not None:
            raise AssertionError(f"{process.args[:3]} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    raise AssertionError(f"no line {pattern!r} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop_cleanly(process: subprocess.Popen, sig: int, log: Path, what: str) -> None:
    """Ctrl-C or SIGTERM: the command exits 0 and says so."""
    process.send_signal(sig)
    try:
        code = process.wait(60)
    except subprocess.TimeoutExpired:
        stop(process)
        raise AssertionError(f"{what} did not stop within 60 s of signal {sig}")
    assert code == 0 and f"{what} stopped" in log.read_text(), log.read_text()[-3000:]


def port_open(url: str) -> bool:
    try:
        requests.get(url, timeout=2)
        return True
    except requests.ConnectionError:
        return False


def without_venv_on_path() -> str:
    """PATH with no folder that holds `uvicorn` or `mlflow`: as for a user who did not activate the environment."""
    return os.pathsep.join(folder for folder in os.environ["PATH"].split(os.pathsep)
                           if folder and not any((Path(folder) / tool).exists() for tool in ("uvicorn", "mlflow")))


def assert_runs_the_compose_mlflow_command(printed: str, service_command: str, native_hosts: set[str]) -> None:
    """`aetrack server` printed the compose service's command, but for paths, addresses and the service's own name."""
    ours, theirs = shlex.split(printed), shlex.split(service_command)
    assert ours[:2] == theirs[:2] == ["mlflow", "server"]
    ours_options, theirs_options = options(ours[2:]), options(theirs[2:])
    assert list(ours_options) == list(theirs_options)  # the same options, in the same order
    for same in ("--serve-artifacts", "--workers", "--app-name"):
        assert ours_options.get(same) == theirs_options.get(same), same
    ours_hosts, theirs_hosts = set(ours_options["--allowed-hosts"].split(",")), set(theirs_options["--allowed-hosts"].split(","))
    assert ours_hosts - native_hosts == theirs_hosts - {"mlflow:5000"}


def get(url: str, path: str, auth=None, **params) -> dict:
    answer = requests.get(f"{url}/api/2.0/mlflow/{path}", params=params, auth=auth, timeout=30)
    assert answer.status_code == 200, f"{path}: {answer.status_code} {answer.text[:300]}"
    return answer.json()


def runs(url: str, experiment_id: str, filter_string: str = "", auth=None) -> list[dict]:
    answer = requests.post(f"{url}/api/2.0/mlflow/runs/search", auth=auth, timeout=30,
                           json={"experiment_ids": [experiment_id], "filter": filter_string, "max_results": 100})
    assert answer.status_code == 200, answer.text[:300]
    return answer.json().get("runs", [])


def tags(run: dict) -> dict[str, str]:
    return {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}


def generate(serve_url: str) -> requests.Response:
    return requests.post(f"{serve_url}/invocations", json={"dataframe_records": [{"n": 2}], "params": {"seed": 0}},
                         timeout=60)


# ---------------------------------------------------------------------------------------------- the stack, natively

@dataclass
class Stack:
    """The compose services, interpolated for this test, and `aetrack server` started on the server host."""

    hosts: Hosts
    services: dict
    remote: dict[str, str]    # container names -> what the worker hosts use
    here: dict[str, str]      # container names -> what this machine uses
    port: int
    server: subprocess.Popen
    log: Path
    model: str
    study: str
    storage: str              # Optuna's database, as this machine reaches it


@pytest.fixture
def stack(hosts, postgres_url, tmp_path):
    database = postgres_url.rsplit("/", 1)[1]
    optuna_db, model, study = f"{database}_optuna", f"stack-{uuid.uuid4().hex[:8]}", "stack"
    pg_host, pg_port = hosts.publish_postgres()
    port = free_port()
    settings = {"POSTGRES_USER": "postgres", "POSTGRES_DB": database, "OPTUNA_DB": optuna_db, "MLFLOW_WORKERS": "1",
                "TRAIN_ARGS": f"{TINY} --epochs 2 --experiment stack --registered-model {model}",
                "TUNE_STUDY": study, "TUNE_TRIALS": "4", "SERVE_MODEL": f"models:/{model}@champion",
                "TUNE_ARGS": f"{TINY} --epochs 2 --param lr=float:1e-3:1e-2:log --experiment stack-tune "
                             f"--registered-model {model} --heartbeat 2"}
    services = compose(**settings)["services"]
    local_pg = f"{hosts.postgres[0]}:{hosts.postgres[1]}"
    # The postgres service's init script, natively: it makes the Optuna database; a second run changes nothing.
    init = {**os.environ, **services["postgres"]["environment"], "PGHOST": hosts.postgres[0],
            "PGPORT": str(hosts.postgres[1]), "PGUSER": "postgres"}
    for _ in range(2):
        done = subprocess.run(["sh", str(REPO / "docker/postgres/10-optuna-database.sh")], env=init,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    log = tmp_path / "server.log"
    server = start([*hosts.prefix("server"), *aetrack_command(), "server", "--backend",
                    f"postgresql://postgres@{pg_host}:{pg_port}/{database}", "--artifacts", str(tmp_path / "artifacts"),
                    "--root", str(tmp_path / "server"), "--host", hosts.address, "--port", str(port), "--workers", "1"],
                   log, {**os.environ, **CLIENT_ENV}, tmp_path)
    yield Stack(hosts, services, remote={"@postgres:5432": f"@{pg_host}:{pg_port}",
                                         "http://mlflow:5000": f"http://{hosts.address}:{port}"},
                here={"@postgres:5432": f"@{local_pg}"}, port=port, server=server, log=log, model=model, study=study,
                storage=f"postgresql://postgres@{local_pg}/{optuna_db}")
    stop(server)
    admin = postgres_url.rsplit("/", 1)[0] + "/postgres"
    subprocess.run(["psql", admin, "-qc", f'DROP DATABASE IF EXISTS "{optuna_db}" WITH (FORCE)'], capture_output=True)


@pytest.mark.timeout(600)
def test_the_stack_on_postgresql_with_workers_on_two_hosts(stack, tmp_path):
    """compose's programs with compose's arguments on a fresh PostgreSQL database: `aetrack server` on the server
    host; training and a two-worker study from the worker hosts; evaluation, serving (without an activated
    environment) and optuna-dashboard from this machine; everything read back through the REST API."""
    hosts, services, model = stack.hosts, stack.services, stack.model
    wait_for_line(stack.log, r"^export MLFLOW_TRACKING_URI=", stack.server, 180)
    assert_runs_the_compose_mlflow_command(stack.log.read_text().splitlines()[0], services["mlflow"]["command"],
                                           {f"{hosts.address}:{stack.port}"})
    assert f"export MLFLOW_TRACKING_URI=http://{hosts.address}:{stack.port}" in stack.log.read_text()
    assert ("no logins (--auth): whoever reaches port" in stack.log.read_text()) == (hosts.kind == "namespaces")
    url = hosts.reach(stack.port)  # this machine's way to the server host

    if hosts.kind == "namespaces":  # the workers reach PostgreSQL only through the server's address
        probe = "import socket; socket.create_connection(('127.0.0.1', %d), timeout=3)" % hosts.postgres[1]
        assert subprocess.run([*hosts.prefix("worker-1"), sys.executable, "-c", probe], capture_output=True).returncode != 0

    # Training on worker-1, with the train service's command and environment.
    train = services["train"]
    done = subprocess.run([*hosts.prefix("worker-1"), *native(train["command"], {})], env=native_env(train, stack.remote),
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    run_id = re.search(r"^run id: +(\w+)", done.stdout, re.MULTILINE).group(1)
    assert f"registered model: models:/{model}/1" in done.stdout

    # Evaluation from this machine, through the same server.
    result = CliRunner().invoke(main, ["evaluate", run_id, "--no-reference", "--iw-samples", "10", "--nll-images", "50",
                                       "--samples", "100", "--tracking-uri", url], env=CLIENT_ENV)
    assert result.exit_code == 0, result.output

    # One study, two workers on two hosts, with the tune-worker service's command and environment.
    worker = services["tune-worker"]
    logs = [tmp_path / f"tune-{host}.log" for host in ("worker-1", "worker-2")]
    workers = [start([*hosts.prefix(host), *native(worker["command"], stack.remote)], log,
                     native_env(worker, stack.remote), tmp_path) for host, log in zip(("worker-1", "worker-2"), logs)]
    try:
        for process in workers:
            process.wait(timeout=300)
    finally:
        for process in workers:
            stop(process)
    assert [p.returncode for p in workers] == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)

    # Optuna's side, read from PostgreSQL: exactly --n-trials in total, both workers contributing.
    tuned = optuna.load_study(study_name=stack.study, storage=stack.storage)
    assert len(tuned.trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in tuned.trials)
    assert {t.user_attrs["worker"].rsplit(":", 1)[1] for t in tuned.trials} == {str(p.pid) for p in workers}

    # MLflow's side, through the REST API: the training run with its evaluation, the study's parent with one child
    # per trial, the registry's versions and champion; artifacts on the server's disk, none on the clients'.
    trained = get(url, "runs/get", run_id=run_id)["run"]
    assert trained["info"]["status"] == "FINISHED"
    assert {"val/best_loss", "test/recon_loss", "test/neg_elbo", "test/nll_iw"} <= \
        {m["key"] for m in trained["data"]["metrics"]}
    assert len(get(url, "metrics/get-history", run_id=run_id, metric_key="val/neg_elbo")["metrics"]) == 2
    assert trained["info"]["artifact_uri"].startswith("mlflow-artifacts:/")
    artifacts = tmp_path / "artifacts"
    assert (artifacts / trained["info"]["experiment_id"] / run_id / "artifacts" / "evaluation").is_dir()
    assert list(artifacts.rglob("MLmodel"))
    assert not [p for p in tmp_path.iterdir() if p.name in ("mlruns", "mlartifacts", "mlflow.db")]

    experiment = get(url, "experiments/get-by-name", experiment_name="stack-tune")["experiment"]
    parents = runs(url, experiment["experiment_id"], "tags.aetrack_role = 'study'")
    assert len(parents) == 1 and tags(parents[0])["optuna_study"] == stack.study
    children = runs(url, experiment["experiment_id"], f"tags.mlflow.parentRunId = '{parents[0]['info']['run_id']}'")
    assert sorted(int(tags(r)["optuna_trial"]) for r in children) == [0, 1, 2, 3]
    assert all(r["info"]["status"] == "FINISHED" for r in children)
    assert {tags(r)["aetrack_worker"].rsplit(":", 1)[1] for r in children} == {str(p.pid) for p in workers}

    versions = get(url, "model-versions/search", filter=f"name = '{model}'")["model_versions"]
    assert len(versions) >= 2 and run_id in {v["run_id"] for v in versions}
    champion = get(url, "registered-models/alias", name=model, alias="champion")["model_version"]
    assert champion["run_id"] == tuned.best_trial.user_attrs["mlflow_run_id"]

    # Serving the champion with the serve service's command, from a shell where the environment is not activated.
    serve, serve_port = services["serve"], free_port()
    serve_env = {**native_env(serve, {"http://mlflow:5000": url}), "PATH": without_venv_on_path()}
    assert shutil.which("uvicorn", path=serve_env["PATH"]) is None
    serve_log = tmp_path / "serve.log"
    serving = start(native(serve["command"], {"--host 0.0.0.0": "--host 127.0.0.1", "--port 5001": f"--port {serve_port}"}),
                    serve_log, serve_env, tmp_path)
    try:
        wait_for_line(serve_log, rf"^serving models:/{model}@champion \(version {champion['version']}\) at ", serving, 240)
        answer = generate(f"http://127.0.0.1:{serve_port}")
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["predictions"]) == 2
        stop_cleanly(serving, signal.SIGTERM, serve_log, "model server")
    finally:
        stop(serving)
    assert not port_open(f"http://127.0.0.1:{serve_port}/ping")

    # optuna-dashboard, with its service's command, shows the study and its trials.
    dashboard, dashboard_port = services["optuna-dashboard"], free_port()
    board_log = tmp_path / "dashboard.log"
    board = start(native(dashboard["command"], {**stack.here, "--host 0.0.0.0": "--host 127.0.0.1",
                                                "--port 8080": f"--port {dashboard_port}"}),
                  board_log, native_env(dashboard, stack.here), tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not port_open(f"http://127.0.0.1:{dashboard_port}/api/studies") and time.monotonic() < deadline:
            assert board.poll() is None, board_log.read_text()[-2000:]
            time.sleep(0.3)
        summaries = requests.get(f"http://127.0.0.1:{dashboard_port}/api/studies", timeout=30).json()["study_summaries"]
        shown = next(s for s in summaries if s["study_name"] == stack.study)
        detail = requests.get(f"http://127.0.0.1:{dashboard_port}/api/studies/{shown['study_id']}", timeout=30).json()
        assert len(detail["trials"]) == 4
    finally:
        stop(board)

    # SIGTERM stops the MLflow server with every process it started.
    stop_cleanly(stack.server, signal.SIGTERM, stack.log, "mlflow server")
    assert not port_open(f"{url}/health")
    assert hosts.pids("server") == []


# ---------------------------------------------------------------------------------------------- logins

@pytest.mark.timeout(300)
def test_the_compose_mlflow_image_answers_a_foreign_login_with_401_and_the_ipv6_loopback_host(postgres_url, tmp_path):
    """The compose `mlflow` service with logins, natively: its own command on the files its Dockerfile copies."""
    root = tmp_path / "image"
    image_env = image_files(REPO / "docker" / "mlflow.Dockerfile", root)
    state = root / "var" / "lib" / "mlflow"
    for folder in ("artifacts", "auth"):
        (state / folder).mkdir(parents=True, exist_ok=True)
    settings = Path(image_env["MLFLOW_AUTH_CONFIG_PATH"])
    settings.write_text(settings.read_text().replace("/var/lib/mlflow", str(state)))

    # The image's aetrack is the login module alone, and it needs nothing else of aetrack.
    loaded = subprocess.run([str(VENV_BIN / "python"), "-c", "import sys, aetrack.tracking.login as m; "
                             "print(m.__file__, *sorted(n for n in sys.modules if n.startswith('aetrack')))"],
                            env={**os.environ, "PYTHONPATH": image_env["PYTHONPATH"]}, capture_output=True, text=True)
    module_file, *modules = loaded.stdout.split()
    assert module_file.startswith(str(root)) and modules == ["aetrack", "aetrack.tracking", "aetrack.tracking.login"]

    database = postgres_url.rsplit("/", 1)[1]
    pg = postgres_url.split("@", 1)[1].rsplit("/", 1)[0]
    admin_password, port = secrets.token_urlsafe(18), free_port()
    service = compose(MLFLOW_AUTH="1", MLFLOW_WORKERS="1", POSTGRES_USER="postgres", POSTGRES_DB=database,
                      MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
                      MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16))["services"]["mlflow"]
    swaps = {"@postgres:5432": f"@{pg}", "/var/lib/mlflow": str(state), "--host 0.0.0.0": "--host 127.0.0.1",
             "--port 5000": f"--port {port}"}
    env = {**native_env(service, swaps), **image_env, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    log = tmp_path / "mlflow.log"
    server = start(native(service["command"], swaps), log, env, state)
    try:
        url, admin = f"http://127.0.0.1:{port}", ("admin", admin_password)
        wait_http(f"{url}/health", server, 180)
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert requests.get(search, auth=admin, timeout=30).status_code == 200
        for header in ("Bearer x", "Digest username=\"admin\"", "Basic"):
            answer = requests.get(search, headers={"Authorization": header}, timeout=30)
            assert answer.status_code == 401, f"{header}: {answer.status_code} {answer.text[:200]}"
        for host, status in ((f"[::1]:{port}", 200), (f"localhost:{port}", 200), (f"evil.example:{port}", 403),
                             (f"::1]:{port}", 403)):
            assert requests.get(search, auth=admin, headers={"Host": host}, timeout=30).status_code == status, host
        assert "Traceback" not in log.read_text()
    finally:
        stop(server)


@pytest.mark.timeout(420)
def test_logins_keep_strangers_out_and_readers_read_only(tmp_path):
    admin_password, writer_password, reader_password = (secrets.token_urlsafe(18) for _ in range(3))
    port, serve_port = free_port(), free_port()
    env = {**os.environ, **CLIENT_ENV, "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password}
    env.pop("MLFLOW_AUTH_ADMIN_USERNAME", None)
    env.pop("MLFLOW_AUTH_CONFIG_PATH", None)
    log = tmp_path / "server.log"
    server = start([*aetrack_command(), "server", "--auth", "--root", str(tmp_path / "server"), "--port", str(port),
                    "--workers", "1"], log, env, tmp_path)
    serving = None
    try:
        wait_for_line(log, r"^export MLFLOW_TRACKING_URI=", server, 180)
        mlflow_command = compose(MLFLOW_AUTH="1", MLFLOW_WORKERS="1")["services"]["mlflow"]["command"]
        assert_runs_the_compose_mlflow_command(log.read_text().splitlines()[0], mlflow_command, {f"127.0.0.1:{port}"})
        url = f"http://127.0.0.1:{port}"
        api = f"{url}/api/2.0/mlflow"

        # Strangers: no credentials, or a wrong password, get 401 on reads and writes alike.
        for auth in (None, ("admin", "not-the-password"), ("nobody", admin_password)):
            assert requests.get(f"{api}/experiments/search", params={"max_results": 1}, auth=auth, timeout=30).status_code == 401
            assert requests.post(f"{api}/experiments/create", json={"name": "x"}, auth=auth, timeout=30).status_code == 401
        assert requests.get(f"{url}/health", timeout=30).status_code == 200  # health checks need no login

        # The admin (password from the environment only) creates a writer and a reader.
        admin = ("admin", admin_password)
        for user, password in (("writer", writer_password), ("reader", reader_password)):
            answer = requests.post(f"{api}/users/create", json={"username": user, "password": password}, auth=admin, timeout=30)
            assert answer.status_code == 200, answer.text

        # The writer trains, registers, evaluates and serves through aetrack.
        writer = {**CLIENT_ENV, "MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": "writer",
                  "MLFLOW_TRACKING_PASSWORD": writer_password}
        model = f"logins-{uuid.uuid4().hex[:8]}"
        trained = CliRunner().invoke(main, ["train", *TINY.split(), "--epochs", "2", "--experiment", "logins",
                                            "--registered-model", model, "--quiet", "--tracking-uri", url], env=writer)
        assert trained.exit_code == 0, trained.output
        run_id = re.search(r"^run id: +(\w+)", trained.output, re.MULTILINE).group(1)
        promoted = CliRunner().invoke(main, ["promote", model, "1", "--tracking-uri", url], env=writer)
        assert promoted.exit_code == 0, promoted.output
        evaluated = CliRunner().invoke(main, ["evaluate", run_id, "--no-reference", "--iw-samples", "10", "--nll-images",
                                              "50", "--samples", "100", "--tracking-uri", url], env=writer)
        assert evaluated.exit_code == 0, evaluated.output
        serve_log = tmp_path / "serve.log"
        serving = start([*aetrack_command(), "serve", f"models:/{model}@champion", "--port", str(serve_port)],
                        serve_log, {**os.environ, **writer}, tmp_path)
        wait_for_line(serve_log, rf"^serving models:/{model}@champion \(version 1\)", serving, 240)
        assert generate(f"http://127.0.0.1:{serve_port}").status_code == 200
        stop_cleanly(serving, signal.SIGINT, serve_log, "model server")

        # What the writer made, read back as the writer.
        run = get(url, "runs/get", auth=("writer", writer_password), run_id=run_id)["run"]
        assert "test/recon_loss" in {m["key"] for m in run["data"]["metrics"]}
        experiment_id = run["info"]["experiment_id"]

        # The reader browses everything and changes nothing.
        reader = ("reader", reader_password)
        assert get(url, "runs/get", auth=reader, run_id=run_id)["run"]["info"]["run_id"] == run_id
        assert get(url, "registered-models/alias", auth=reader, name=model, alias="champion")["model_version"]["version"] == "1"
        assert runs(url, experiment_id, auth=reader)
        for path, body in (("runs/create", {"experiment_id": experiment_id}),
                           ("runs/log-metric", {"run_id": run_id, "key": "x", "value": 1, "timestamp": 0}),
                           ("registered-models/alias", {"name": model, "alias": "champion", "version": "1"})):
            answer = requests.post(f"{api}/{path}", json=body, auth=reader, timeout=30)
            assert answer.status_code == 403, f"{path}: {answer.status_code}"
        as_reader = CliRunner().invoke(main, ["promote", model, "1", "--alias", "mine", "--tracking-uri", url],
                                       env={**CLIENT_ENV, "MLFLOW_TRACKING_USERNAME": "reader",
                                            "MLFLOW_TRACKING_PASSWORD": reader_password})
        assert as_reader.exit_code == 1 and as_reader.output.count("Error:") == 1, as_reader.output
        assert "Traceback" not in as_reader.output

        # Ctrl-C stops the server; the admin password was never written anywhere.
        stop_cleanly(server, signal.SIGINT, log, "mlflow server")
        assert not port_open(f"{url}/health")
        for path in (tmp_path / "server").rglob("*"):
            if path.is_file():
                assert admin_password.encode() not in path.read_bytes(), path
    finally:
        if serving is not None:
            stop(serving)
        stop(server)
