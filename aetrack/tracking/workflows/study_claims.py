"""Who trains which run of a study: leases in one small table of an SQL database (SQLite on one machine; the team
stack's PostgreSQL for workers on many hosts, the database `aetrack tune` workers share).

A worker claims a task (one setting, one seed) by inserting its row, or by taking over a row whose lease expired; a
live worker renews its lease while it trains, so a killed worker's task is free again `lease` seconds after its last
renewal and another worker retrains it. The primary key makes two inserts of one task impossible, and the takeover is
one UPDATE guarded by the expiry, so two workers never both hold a task. Which runs are done is not kept here: the
study's MLflow experiment says so (a finished, evaluated run), so a stopped study resumes from MLflow as before.

Expiry is read on each worker's clock: hosts are assumed to agree on the time within a small part of the lease.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager

import sqlalchemy
from sqlalchemy import Column, Float, MetaData, String, Table

TABLE = Table("aetrack_study_claims", MetaData(),
              Column("study", String(200), primary_key=True),
              Column("task", String(500), primary_key=True),
              Column("owner", String(200), nullable=False),
              Column("expires", Float, nullable=False))


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Claims:
    """Leases on the tasks of one study (`study`: its experiment name) in the database at `url`."""

    def __init__(self, url: str, study: str, lease: float = 120.0, owner: str | None = None):
        engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
        self.engine = sqlalchemy.create_engine(url, **engine_kwargs)
        self.study, self.lease, self.owner = study, lease, owner or worker_name()
        for attempt in range(5):
            try:
                TABLE.create(self.engine, checkfirst=True)
                break
            except sqlalchemy.exc.SQLAlchemyError:
                # Workers started together on an empty database race to create the table; the loser retries.
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def _row(self, task: str):
        return (TABLE.c.study == self.study) & (TABLE.c.task == task)

    def claim(self, task: str) -> bool:
        """Take `task` if nobody holds a live lease on it; True if this worker now holds it."""
        now = time.time()
        try:
            with self.engine.begin() as connection:
                connection.execute(TABLE.insert().values(study=self.study, task=task, owner=self.owner,
                                                         expires=now + self.lease))
            return True
        except sqlalchemy.exc.IntegrityError:
            pass  # held, or left behind by a worker that died: take it over only once its lease ran out
        with self.engine.begin() as connection:
            taken = connection.execute(TABLE.update().where(self._row(task) & (TABLE.c.expires < now))
                                       .values(owner=self.owner, expires=now + self.lease))
        return taken.rowcount == 1

    def renew(self, task: str) -> bool:
        with self.engine.begin() as connection:
            renewed = connection.execute(TABLE.update().where(self._row(task) & (TABLE.c.owner == self.owner))
                                         .values(expires=time.time() + self.lease))
        return renewed.rowcount == 1

    def release(self, task: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(TABLE.delete().where(self._row(task) & (TABLE.c.owner == self.owner)))

    @contextmanager
    def holding(self, task: str):
        """Renew the lease on `task` every third of the lease while the block runs; release it after."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.lease / 3):
                try:
                    self.renew(task)
                except sqlalchemy.exc.SQLAlchemyError:
                    pass  # a database hiccup: the next beat tries again, within the lease
        thread = threading.Thread(target=beat, daemon=True, name=f"lease {task}")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.release(task)

    def close(self) -> None:
        self.engine.dispose()


class NoClaims:
    """One worker alone: every task is its own."""

    def claim(self, task: str) -> bool:
        return True

    @contextmanager
    def holding(self, task: str):
        yield

    def close(self) -> None:
        pass
