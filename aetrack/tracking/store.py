"""A new local sqlite store in milliseconds instead of seconds: MLflow builds an empty store by running its whole
chain of schema migrations (~2 s of the ~3 s a new store's first access takes, measured in
benchmarks/surroundings.py). The empty, migrated database is the same for every store of one MLflow version, so
it is built once per machine with MLflow's own code, kept in a cache folder, and copied where a new store is
to be. MLflow then opens it as an existing store: it checks the schema version and adds its Default experiment
itself, so what it stores is what it would have stored. Anything unusual (not sqlite, a store that exists, a
cache that cannot be written) leaves the store to MLflow."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aetrack"


def sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///` tracking URI (None for anything else, an in-memory database included)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def template() -> Path:
    """The empty store of this MLflow version, migrated by MLflow (`_initialize_tables`, what a new store runs)."""
    import mlflow
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    cached = cache_folder() / f"mlflow-{mlflow.__version__}-empty.db"
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".empty-", suffix=".db", dir=cached.parent)
    os.close(handle)
    try:
        engine = sqlalchemy.create_engine(f"sqlite:///{tmp}")
        try:
            _initialize_tables(engine)
        finally:
            engine.dispose()
        os.replace(tmp, cached)  # whole or not at all: a concurrent build writes the same file
    finally:
        Path(tmp).unlink(missing_ok=True)
    return cached


def prepare(uri: str) -> bool:
    """Give a `sqlite:///` store that does not exist yet its empty, migrated database; True when it did."""
    path = sqlite_path(uri)
    if path is None or path.exists() or not path.parent.is_dir():
        return False
    try:
        empty = template().read_bytes()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "xb") as file:  # the mode MLflow's own file would get (the umask's), not mkstemp's 0600
                file.write(empty)
            os.link(tmp, path)  # fails if another process created the store meanwhile: theirs stays
        finally:
            tmp.unlink(missing_ok=True)
    except Exception:  # noqa: BLE001 - any failure (FileExistsError too): MLflow opens or creates the store itself
        return False
    return True
