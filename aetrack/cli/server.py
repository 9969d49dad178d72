"""`aetrack server` and `aetrack serve`: the team stack's MLflow server, and a model's HTTP server, started natively.

`aetrack server` runs `mlflow server` with the arguments of docker-compose.yml's `mlflow` service
(aetrack/tracking/server.py builds them), waits until it answers, prints the URI to export, and on Ctrl-C or
SIGTERM stops it with every process it started (aetrack/serving/process.py). `aetrack serve` does the same for
`mlflow models serve --env-manager local`, and works without activating the environment.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import socket
import sys
from pathlib import Path

import click

from aetrack.cli.options import friendly_errors, tracking_uri_option, use_tracking_uri
from aetrack.serving.process import Child, check_port, environment, local_url, run_until_stopped
from aetrack.tracking.server import (AUTH_SETTINGS, WILDCARDS, allowed_hosts, check_postgres, is_loopback,
                                     server_arguments, split_password, write_auth_config)



@click.command()
@click.option("--backend", envvar="MLFLOW_BACKEND_STORE_URI", show_envvar=True, default=None, metavar="URL",
              help="Where runs and the registry live: an SQLAlchemy URL such as postgresql://USER@HOST:5432/mlflow "
                   "(a password in it reaches the server through PGPASSWORD)  [default: SQLite in --root]")
@click.option("--artifacts", default=None, metavar="DIR|URI",
              help="Where the server stores artifacts; clients upload and download through the server  "
                   "[default: ROOT/artifacts]")
@click.option("--root", default="mlflow-server", show_default=True, envvar="AETRACK_SERVER_ROOT", show_envvar=True,
              help="Folder for the server's own files: the SQLite store, artifacts, server.log, the login database.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on: 0.0.0.0 (or this machine's address) for clients on other machines.")
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Server worker processes.")
@click.option("--allowed-host", "extra_hosts", multiple=True, metavar="NAME:PORT",
              help="Another Host name that clients use, e.g. mlflow.example.org:5000 (repeatable; fnmatch patterns); "
                   "loopback and the --host address are always allowed.")
@click.option("--auth", is_flag=True,
              help="Logins: MLflow's basic-auth app; the admin password comes from $MLFLOW_AUTH_ADMIN_PASSWORD.")
@click.option("--auth-db", default=None, metavar="URL", help="The login database  [default: SQLite in --root]")
@click.option("--timeout", type=click.FloatRange(1, 3600), default=180, show_default=True,
              help="Seconds to wait for the server to answer.")
@friendly_errors
def server(backend, artifacts, root, host, port, workers, extra_hosts, auth, auth_db, timeout):
    """Start the team's MLflow server (tracking, registry, artifact proxy) as docker-compose.yml's `mlflow`
    service does, and print the MLFLOW_TRACKING_URI to export. Ctrl-C stops it.

    \b
    aetrack server                                                # SQLite and artifacts in ./mlflow-server
    aetrack server --backend postgresql://aetrack@db:5432/mlflow --host 0.0.0.0
    MLFLOW_AUTH_ADMIN_PASSWORD=... aetrack server --auth          # logins; users and permissions over the REST API
    """
    if auth and not os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD"):
        raise click.UsageError("--auth needs the admin's password in $MLFLOW_AUTH_ADMIN_PASSWORD (MLflow uses it "
                               "to create the admin user on an empty login database; keep it out of any file)")
    if auth_db and not auth:
        raise click.UsageError("--auth-db needs --auth")
    root_path = Path(root).expanduser().resolve()
    if not root_path.exists():
        root_path.mkdir(parents=True, mode=0o700)  # the SQLite store and the login database's password hashes
    backend, password = split_password(backend or f"sqlite:///{root_path / 'mlflow.db'}")
    check_postgres(backend, password)
    from aetrack.tracking import store

    store.prepare(backend)  # a new SQLite store: copied from the migrated empty one, not migrated again (seconds)
    if artifacts is None or "://" not in artifacts:
        artifacts_path = Path(artifacts or root_path / "artifacts").expanduser().resolve()
        artifacts_path.mkdir(parents=True, exist_ok=True)
        artifacts = str(artifacts_path)
    check_port(host, port)

    # MLflow's job runner (GenAI scorers; seven worker processes) has no use here and would slow everything down.
    changes: dict[str, str | None] = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION":
                                      os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")}
    if password:
        changes["PGPASSWORD"] = password
    if auth:
        if not os.environ.get("MLFLOW_AUTH_CONFIG_PATH"):
            config = root_path / "basic_auth.ini"
            write_auth_config(config, auth_db or f"sqlite:///{root_path / 'basic_auth.db'}")
            changes["MLFLOW_AUTH_CONFIG_PATH"] = str(config)
        # The key only signs the sign-up page's CSRF tokens; one per start is enough when none is given.
        changes["MLFLOW_FLASK_SERVER_SECRET_KEY"] = os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY") or secrets.token_hex(32)

    hosts = allowed_hosts(host, port, extra_hosts)
    arguments = server_arguments(backend=backend, artifacts=artifacts, host=host, port=port, workers=workers,
                                 allowed_hosts=hosts, auth=auth)
    click.echo(shlex.join(["mlflow", "server", *arguments]))
    log = root_path / "server.log"
    child = Child("mlflow server", [sys.executable, "-m", "mlflow", "server", *arguments], environment(**changes), log)
    url = local_url(host, port)

    def ready() -> None:
        click.echo(f"MLflow server on {url}: runs and registry in {backend}, artifacts in {artifacts} "
                   f"(served through it), log in {log}")
        if auth:
            admin = os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME") or AUTH_SETTINGS["admin_username"]
            click.echo(f"logins on: admin user {admin!r} adds users (POST {url}/api/2.0/mlflow/users/create); "
                       "clients export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
        elif not is_loopback(host):
            click.echo(f"no logins (--auth): whoever reaches port {port} can read and change every run and model")
        if host in WILDCARDS:
            click.echo(f"on other machines: export MLFLOW_TRACKING_URI=http://{socket.getfqdn()}:{port}")
        click.echo(f"export MLFLOW_TRACKING_URI={url}")
        click.echo("Ctrl-C stops it")

    run_until_stopped(child, f"{url}/health", timeout, ready, click.echo)


@click.command()
@click.argument("model_uri")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=5001, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Server worker processes.")
@click.option("--allowed-host", "extra_hosts", multiple=True, metavar="NAME:PORT",
              help="Another Host name that clients use, e.g. generator.example.org:5001 (repeatable; * is a wildcard, "
                   "* alone allows any); loopback and the --host address are always allowed, every other Host gets 403.")
@click.option("--timeout", type=click.FloatRange(1, 3600), default=180, show_default=True,
              help="Seconds to wait for the model server to answer.")
@tracking_uri_option
@friendly_errors
def serve(model_uri, host, port, workers, extra_hosts, timeout, tracking_uri):
    """Serve a model over HTTP with `mlflow models serve --env-manager local`; works without activating the
    environment. MODEL_URI: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/MODEL (MODEL: the variant, e.g. vae) or a run id.

    \b
    aetrack serve models:/aetrack-digits-vae@champion --port 5001
    curl -s localhost:5001/invocations -H 'Content-Type: application/json' -d '{"dataframe_records": [{"n": 2}]}'
    """
    if re.fullmatch(r"[0-9a-f]{32}", model_uri):  # a run id: its logged model
        from aetrack.tracking.artifacts import model_uri_of

        use_tracking_uri(tracking_uri)
        model_uri = model_uri_of(model_uri)
    check_port(host, port)
    described = describe_model(model_uri, tracking_uri)
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
               "--host", host, "--port", str(port), "--workers", str(workers)]
    hosts = allowed_hosts(host, port, extra_hosts)  # checked by aetrack's request guard, as `mlflow server` does
    child = Child("model server", command, environment(MLFLOW_TRACKING_URI=tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"),
                                                       AETRACK_SERVE_ALLOWED_HOSTS=",".join(hosts)))
    url = local_url(host, port)

    def ready() -> None:
        child.echo = True  # from now on its request log is the user's to see
        click.echo(f"serving {described} at {url}/invocations (Ctrl-C stops it)")

    run_until_stopped(child, f"{url}/ping", timeout, ready, click.echo)


def describe_model(model_uri: str, tracking_uri: str | None) -> str:
    """Check that the model exists and is a pyfunc model, in one line if not; name the version an alias points at."""
    import mlflow
    from mlflow.models import get_model_info

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    info = get_model_info(model_uri)
    if "python_function" not in info.flavors:
        raise click.ClickException(f"{model_uri} is not a pyfunc model (flavors: {', '.join(info.flavors)})")
    alias = re.fullmatch(r"models:/([^/@]+)@([^/]+)", model_uri)
    if alias:
        version = mlflow.MlflowClient().get_model_version_by_alias(*alias.groups()).version
        return f"{model_uri} (version {version})"
    return model_uri
