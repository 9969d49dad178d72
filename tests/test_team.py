"""A team on one MLflow server with logins (`aetrack server --auth`): headers that are not a login get 401 and
never a 500; every member can work in their own space or in one the admin shares, and a refusal is one line
that names the user, the resource and the permission missing."""

from __future__ import annotations

import base64
import os
import secrets
import subprocess

import mlflow
import pytest
import requests

from conftest import aetrack_command, free_port, stop
from test_stack import CLIENT_ENV, start, wait_for_line

# Authorization headers that are not Basic with a user and a password, or not one MLflow can read.
FOREIGN_HEADERS = [
    "Bearer x",
    "Bearer " + "a" * 4000,
    "Digest username=\"admin\", realm=\"mlflow\", nonce=\"1\", uri=\"/\", response=\"0\"",
    "Negotiate YIIB",
    "Token abc",
    "Basic",
    "Basic !!!not-base64!!!",
    "Basic " + base64.b64encode(b"no-colon").decode(),
    "Basic " + base64.b64encode(b":").decode(),
    "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(),
    "basic " + base64.b64encode(b"admin:wrong").decode(),
    "x",
    "",
]


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """`aetrack server --auth` with one worker, as the docs start it: (url, admin credentials, log path)."""
    root = tmp_path_factory.mktemp("team")
    admin_password = secrets.token_urlsafe(18)
    env = {**os.environ, **CLIENT_ENV, "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password}
    env.pop("MLFLOW_AUTH_ADMIN_USERNAME", None)
    env.pop("MLFLOW_AUTH_CONFIG_PATH", None)
    port, log = free_port(), root / "server.log"
    server = start([*aetrack_command(), "server", "--auth", "--root", str(root / "server"), "--port", str(port),
                    "--workers", "1"], log, env, root)
    try:
        wait_for_line(log, r"^export MLFLOW_TRACKING_URI=", server, 180)
        yield f"http://127.0.0.1:{port}", ("admin", admin_password), log
    finally:
        stop(server)


@pytest.mark.slow
def test_a_foreign_or_malformed_authorization_header_gets_401_never_500(auth_server):
    url, admin, log = auth_server
    api = f"{url}/api/2.0/mlflow"
    assert requests.get(f"{api}/experiments/search", params={"max_results": 1}, auth=admin, timeout=30).status_code == 200
    for header in FOREIGN_HEADERS:
        for method, path, body in (("GET", "experiments/search?max_results=1", None),
                                   ("POST", "experiments/create", {"name": "x"}),
                                   ("GET", "registered-models/search", None)):
            answer = requests.request(method, f"{api}/{path}", json=body, headers={"Authorization": header}, timeout=30)
            assert answer.status_code == 401, f"{header[:40]!r} {path}: {answer.status_code} {answer.text[:200]}"
    # and a good login still goes through (the cache was not poisoned), with nothing in the log as a traceback; the
    # IPv6 loopback name is a Host the server answers, a stranger's name is not
    port = url.rsplit(":", 1)[1]
    for host, status in ((f"127.0.0.1:{port}", 200), (f"[::1]:{port}", 200), (f"evil.example:{port}", 403)):
        answer = requests.get(f"{api}/experiments/search", params={"max_results": 1}, auth=admin, timeout=30,
                              headers={"Host": host})
        assert answer.status_code == status, f"Host: {host}: {answer.status_code}"
    assert "Traceback" not in log.read_text() and "Error" not in "".join(
        line for line in log.read_text().splitlines() if "NoneType" in line)


TINY = ["--hidden", "16", "--latent-dim", "2", "--epochs", "2", "--patience", "0", "--quiet"]


def as_user(user: str, password: str, url: str) -> dict[str, str]:
    return {**CLIENT_ENV, "MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}


def aetrack(env: dict[str, str], *args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([*aetrack_command(), *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, **env})


def refusal(done: subprocess.CompletedProcess) -> str:
    """The one `Error:` line of a refused command, which ran nothing (exit 1)."""
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert done.returncode == 1 and len(errors) == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "403" not in done.stderr
    return errors[0]


def grant(url: str, admin, user: str, resource_type: str, resource_id: str, permission: str = "EDIT") -> None:
    """What the admin runs (docs/reliability.md shows it as curl)."""
    answer = requests.post(f"{url}/api/3.0/mlflow/users/permissions/grant", auth=admin, timeout=30,
                           json={"username": user, "resource_type": resource_type, "resource_id": resource_id,
                                 "permission": permission})
    assert answer.status_code == 200, answer.text


@pytest.mark.slow
def test_two_users_and_a_reader_each_work_in_their_own_space_or_a_shared_one(auth_server, tmp_path):
    url, admin, _ = auth_server
    passwords = {user: secrets.token_urlsafe(12) for user in ("alice", "bob", "carol")}
    for user, password in passwords.items():
        answer = requests.post(f"{url}/api/2.0/mlflow/users/create", json={"username": user, "password": password},
                               auth=admin, timeout=30)
        assert answer.status_code == 200, answer.text
    alice, bob, carol = (as_user(user, passwords[user], url) for user in ("alice", "bob", "carol"))
    client = mlflow.MlflowClient(url)  # reads as the admin below, through the environment
    os.environ.update({"MLFLOW_TRACKING_USERNAME": admin[0], "MLFLOW_TRACKING_PASSWORD": admin[1]})
    try:
        # Alice trains first: the experiment `aetrack` and the model `aetrack-digits-vae` are hers.
        trained = aetrack(alice, "train", *TINY, cwd=tmp_path)
        assert trained.returncode == 0, trained.stderr[-2000:]
        assert aetrack(alice, "promote", "aetrack-digits-vae", "1", cwd=tmp_path).returncode == 0
        experiment_id = client.get_experiment_by_name("aetrack").experiment_id

        def run_count() -> int:
            return len(client.search_runs([experiment_id]))

        # Bob in Alice's experiment: refused before any run, in one line naming him, the experiment and EDIT.
        line = refusal(aetrack(bob, "train", *TINY, cwd=tmp_path))
        assert "user 'bob' may not create runs in experiment 'aetrack': that needs EDIT, and bob has READ" in line
        assert "--experiment bob-aetrack" in line
        assert run_count() == 1

        # Bob in his own space: his experiment, his model, his alias.
        own = aetrack(bob, "train", *TINY, "--experiment", "bob-aetrack", "--registered-model", "bob-digits-vae",
                      cwd=tmp_path)
        assert own.returncode == 0, own.stderr[-2000:]
        assert aetrack(bob, "promote", "bob-digits-vae", "1", cwd=tmp_path).returncode == 0
        tuned = aetrack(bob, "tune", *TINY[:-1], "--n-trials", "1", "--experiment", "bob-aetrack", "--registered-model",
                        "bob-digits-vae", "--storage", f"sqlite:///{tmp_path}/bob-optuna.db", cwd=tmp_path)
        assert tuned.returncode == 0, tuned.stderr[-2000:]
        assert "champion:" in tuned.stdout  # his study registered its best trial and judged it against his versions

        # The admin shares the experiment with Bob; Alice's model is still hers: refused before training.
        grant(url, admin, "bob", "experiment", experiment_id)
        line = refusal(aetrack(bob, "train", *TINY, cwd=tmp_path))
        assert ("user 'bob' may not register versions of registered model 'aetrack-digits-vae': that needs EDIT, "
                "and bob has READ") in line
        assert run_count() == 1
        line = refusal(aetrack(bob, "promote", "aetrack-digits-vae", "1", "--alias", "bobs", cwd=tmp_path))
        assert "user 'bob' may not set aliases of registered model 'aetrack-digits-vae': that needs EDIT" in line

        # ... and then the model: Bob trains, registers version 2 and promotes it in the shared space.
        grant(url, admin, "bob", "registered_model", "aetrack-digits-vae")
        shared = aetrack(bob, "train", *TINY, cwd=tmp_path)
        assert shared.returncode == 0, shared.stderr[-2000:]
        assert "models:/aetrack-digits-vae/2" in shared.stdout
        assert aetrack(bob, "promote", "aetrack-digits-vae", "2", cwd=tmp_path).returncode == 0
        assert client.get_model_version_by_alias("aetrack-digits-vae", "champion").version == "2"

        # Carol reads everything and changes nothing; each refusal is one line.
        assert len(client.search_runs([experiment_id])) == 2
        line = refusal(aetrack(carol, "train", *TINY, cwd=tmp_path))
        assert "user 'carol' may not create runs in experiment 'aetrack': that needs EDIT, and carol has READ" in line
        line = refusal(aetrack(carol, "promote", "aetrack-digits-vae", "1", cwd=tmp_path))
        assert "user 'carol' may not set aliases of registered model 'aetrack-digits-vae'" in line
        line = refusal(aetrack(carol, "tune", *TINY[:-1], "--n-trials", "1", "--storage",
                               f"sqlite:///{tmp_path}/optuna.db", cwd=tmp_path))  # her own tuning experiment, Alice's model
        assert "user 'carol' may not register versions of registered model 'aetrack-digits-vae'" in line
        assert "--registered-model carol-aetrack-digits-vae" in line
        assert run_count() == 2
    finally:
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(name, None)
