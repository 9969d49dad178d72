"""The study's storage: Optuna's RDBStorage with a trial budget and a first-writer-wins study attribute,
both race-free for any number of workers on any number of machines. The only module that touches Optuna's
internals (its RDB schema and a trial's storage id), checked on Optuna 5.x.
"""

from __future__ import annotations

import json
import random
import time
import warnings
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._rdb import models as rdb  # the schema is stable since Optuna 3; StudyStorage needs its tables
from optuna.trial import FrozenTrial

from aetrack.tuning import TuningError


class TrialBudgetSpent(Exception):
    """`study.ask()` found the study already holding its budget of trials."""


class StudyStorage(RDBStorage):
    """RDBStorage with two race-free additions, for any number of workers on any number of machines.

    - It never creates a trial beyond `budget`. The count is taken inside the transaction that inserts
      the trial, after the insert, where Optuna already holds a lock on the study's row (PostgreSQL, MySQL)
      or SQLite holds its write lock: two workers cannot both take the last trial. A retry of a dead
      worker's trial (created from a template) replaces the failure and passes.
    - `claim_study_user_attr` sets a study attribute unless it is set: the first insert wins on the
      table's unique (study_id, key) constraint, and everyone reads back the winner.
    """

    budget: int | None = None

    def _get_prepared_new_trial(self, study_id, template_trial, session):
        trial = super()._get_prepared_new_trial(study_id, template_trial, session)
        if template_trial is None and self.budget is not None and self._used(session, study_id) > self.budget:
            raise TrialBudgetSpent(f"the study holds its {self.budget} trials")  # rolls the insert back
        return trial

    @staticmethod
    def _used(session, study_id: int) -> int:
        trials = session.query(rdb.TrialModel).filter(rdb.TrialModel.study_id == study_id).count()
        retries = (session.query(rdb.TrialSystemAttributeModel).join(rdb.TrialModel)
                   .filter(rdb.TrialModel.study_id == study_id, rdb.TrialSystemAttributeModel.key == "failed_trial")
                   .count())
        return trials - retries

    def claim_study_user_attr(self, study_id: int, key: str, value) -> Any:
        try:
            with self.engine.begin() as connection:
                connection.execute(sqlalchemy.insert(rdb.StudyUserAttributeModel.__table__)
                                   .values(study_id=study_id, key=key, value_json=json.dumps(value)))
        except sqlalchemy.exc.IntegrityError:
            pass  # someone else's value is there
        return self.get_study_user_attrs(study_id)[key]


def used_trials(trials: list[FrozenTrial]) -> int:
    """Trials that count towards --n-trials: all, less the failures that a retry replaced."""
    return len(trials) - sum("failed_trial" in t.system_attrs for t in trials)


def open_storage(url: str, *, budget: int | None, heartbeat: int, grace_period: int, max_retry: int) -> StudyStorage:
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = StudyStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat,
                                       grace_period=grace_period,
                                       heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retry))
            break
        except sqlalchemy.exc.ArgumentError as err:
            raise TuningError(f"--storage {url!r} is not an SQLAlchemy URL ({err})") from None
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError):
            # Workers started together on an empty database race to create Optuna's tables; the loser retries.
            if attempt == 4:
                raise
            time.sleep(0.5 + random.random())
    storage.budget = budget
    return storage


def redact(url: str) -> str:
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


def retry_of(trial: optuna.Trial) -> int | None:
    """The number of the dead trial that `trial` retries, if it is a retry."""
    return trial.storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")


def retry_later(trial: optuna.Trial) -> None:
    """Queue a retry of `trial`, as for a dead worker's (same params, `failed_trial` set, --max-retry honoured): a
    trial that a signal stopped runs again when a worker next takes one, and does not use up the budget."""
    callback = trial.storage.get_heartbeat_stale_trial_callback()
    if callback is not None:
        callback(trial.study, trial.storage.get_trial(trial._trial_id))
