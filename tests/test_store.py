"""A new local sqlite store is a copy of the empty store MLflow migrates once per machine (aetrack/tracking/store.py):
MLflow then finds what it would have made itself."""

from __future__ import annotations

import sqlite3

import pytest
from click.testing import CliRunner

from aetrack.tracking import store


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def schema(path) -> tuple:
    """Tables, indexes and the migration reached; a table's clauses as a set: MLflow's own migrations write a
    table's constraints in an order that differs from one run to the next."""
    with sqlite3.connect(path) as db:
        objects = db.execute("select type, name, sql from sqlite_master order by type, name").fetchall()
        version = db.execute("select version_num from alembic_version").fetchall()
    clauses = lambda sql: frozenset(line.strip().rstrip(",") for line in (sql or "").splitlines())  # noqa: E731
    return tuple((kind, name, clauses(sql)) for kind, name, sql in objects), tuple(version)


@pytest.mark.slow  # MLflow migrates a store from scratch: seconds
def test_a_new_store_is_the_store_mlflow_makes_and_mlflow_opens_it_as_its_own(tmp_path):
    import mlflow

    ours, theirs = tmp_path / "ours.db", tmp_path / "theirs.db"
    assert store.prepare(f"sqlite:///{ours}")
    assert ours.is_file() and schema(ours)[1]  # migrated before MLflow touched it
    for path in (ours, theirs):
        mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    assert schema(ours) == schema(theirs)
    client = mlflow.MlflowClient(f"sqlite:///{ours}")
    assert [e.name for e in client.search_experiments()] == ["Default"]
    run = client.create_run(client.create_experiment("e"))
    client.log_metric(run.info.run_id, "m", 1.0)
    assert client.get_run(run.info.run_id).data.metrics == {"m": 1.0}


def test_a_store_that_exists_or_is_no_local_file_is_left_to_mlflow(tmp_path):
    existing = tmp_path / "existing.db"
    existing.write_bytes(b"not touched")
    assert not store.prepare(f"sqlite:///{existing}")
    assert existing.read_bytes() == b"not touched"
    assert not store.prepare("sqlite:///:memory:")
    assert not store.prepare("postgresql://u@127.0.0.1/db")
    assert not store.prepare(f"sqlite:///{tmp_path}/missing-folder/store.db")
    assert not (tmp_path / "missing-folder").exists()


@pytest.mark.slow  # builds the cached empty store: MLflow migrates it from scratch
def test_aetrack_server_starts_mlflow_on_a_store_already_migrated(tmp_path, monkeypatch):
    from aetrack.cli import server as cli_server
    from aetrack.cli.main import main

    found = {}

    class FakeChild:
        def __init__(self, name, command, env, log=None):
            found["version"] = schema(tmp_path / "root" / "mlflow.db")[1]

    monkeypatch.setattr(cli_server, "Child", FakeChild)
    monkeypatch.setattr(cli_server, "check_port", lambda host, port: None)
    monkeypatch.setattr(cli_server, "run_until_stopped", lambda *args: None)
    result = CliRunner().invoke(main, ["server", "--root", str(tmp_path / "root"), "--port", "5999"])
    assert result.exit_code == 0, result.output
    assert found["version"]  # the schema was in place before `mlflow server` started
