"""The team's MLflow server as docker-compose.yml's `mlflow` service runs it: `mlflow server`'s arguments (runs and
the registry in PostgreSQL or SQLite, artifacts proxied through the server so that clients need no storage
credentials, the Host names it answers to, optionally MLflow's basic-auth logins), the backend's password kept out
of the process list, and the checks that fail in one line before anything starts. `aetrack server` runs it."""

from __future__ import annotations

import socket
from pathlib import Path

from aetrack.config import UserError
from aetrack.serving.process import bracketed, first_line

WILDCARDS = ("0.0.0.0", "::", "")
# Loopback names cannot be rebound by a remote DNS. MLflow matches a pattern with `*` by fnmatch, where `[` opens a
# character class: `[[]` is a literal `[`, as in MLflow's own default list (`[::1]:*` would match no IPv6 Host).
LOOPBACK_HOSTS = ("localhost:*", "127.0.0.1:*", "[[]::1]:*")
AUTH_APP = "basic-auth"
# docker/mlflow/basic_auth.ini holds the same settings for the compose service. No admin_password: MLflow reads it
# from $MLFLOW_AUTH_ADMIN_PASSWORD the first time it starts on an empty login database.
AUTH_SETTINGS = {
    "default_permission": "READ",
    "admin_username": "admin",
    "authorization_function": "aetrack.tracking.login:authenticate_request",
    # Checking a password costs a deliberately slow hash (scrypt, about 0.1 s here); a training run makes hundreds of
    # requests. Measured with one server worker, a 30-epoch digits run took 94 s without the cache (MLflow's default,
    # 0) and 21 s with it. A good login is remembered for a minute per server worker (a changed password reaches the
    # other workers within it).
    "auth_cache_ttl_seconds": "60",
}


def server_arguments(*, backend: str, artifacts: str, host: str, port: int, workers: int, allowed_hosts: list[str],
                     auth: bool) -> list[str]:
    """`mlflow server`'s arguments, in the order of docker-compose.yml's `mlflow` service."""
    arguments = ["--backend-store-uri", backend, "--artifacts-destination", artifacts, "--serve-artifacts",
                 "--host", host, "--port", str(port), "--workers", str(workers), "--allowed-hosts", ",".join(allowed_hosts)]
    return arguments + (["--app-name", AUTH_APP] if auth else [])


def allowed_hosts(host: str, port: int, extra: tuple[str, ...] = ()) -> list[str]:
    """Host headers the server accepts: loopback, the address it listens on (this machine's names when it listens
    on every interface), and `extra`. Anything else is refused, against DNS rebinding."""
    names = list(LOOPBACK_HOSTS)
    if host in WILDCARDS:
        names += [f"{name}:{port}" for name in (socket.gethostname(), socket.getfqdn())]
    else:
        names.append(f"{bracketed(host)}:{port}")
    return list(dict.fromkeys([*names, *extra]))


def is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def split_password(url: str) -> tuple[str, str | None]:
    """A PostgreSQL URL without its password, and the password. The server gets the password through PGPASSWORD,
    which libpq reads, so that it never shows in the process list."""
    import sqlalchemy

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        return url, None  # not an SQLAlchemy URL (a file store): MLflow judges it
    if parsed.get_backend_name() != "postgresql" or parsed.password is None:
        return url, None
    return parsed.set(password=None).render_as_string(hide_password=False), str(parsed.password)


def check_postgres(url: str, password: str | None) -> None:
    """Fail in one line, before anything starts, when the PostgreSQL backend does not answer."""
    import sqlalchemy

    parsed = sqlalchemy.engine.make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return
    import psycopg

    options = {key: value for key, value in parsed.query.items() if isinstance(value, str)}
    settings = {"host": parsed.host, "port": parsed.port, "user": parsed.username, "password": password,
                "dbname": parsed.database, **options}
    try:
        psycopg.connect(**{k: v for k, v in settings.items() if v is not None}, connect_timeout=5).close()
    except psycopg.Error as err:
        raise UserError(f"cannot connect to the backend {url}: {first_line(err)}") from None


def write_auth_config(path: Path, database_uri: str) -> None:
    lines = ["# Written by `aetrack server --auth` at every start; the admin password comes from the environment.",
             "[mlflow]", f"database_uri = {database_uri.replace('%', '%%')}"]  # configparser reads % as interpolation
    lines += [f"{key} = {value}" for key, value in AUTH_SETTINGS.items()]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
