"""One trial: a child run of the study's parent run (`train_tracked`), reporting its objective to Optuna
every epoch so that the pruner can stop it; the best trial so far registers its model."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import socket
from dataclasses import dataclass
from typing import Any

import mlflow
import optuna
import torch
from optuna.trial import TrialState

from aetrack import checkpoints
from aetrack.config import TrainConfig
from aetrack.tracking import describe, tags
from aetrack.tracking.registry import describe_version
from aetrack.tracking.run import train_tracked
from aetrack.tuning.space import SearchSpace
from aetrack.tuning.storage import retry_later, retry_of

HOST = socket.gethostname()
WORKER = f"{HOST}:{os.getpid()}"


class ReportEpochs:
    """Reports the objective after each epoch; raises TrialPruned (which stops `fit`) when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str):
        self.trial, self.metric, self.epochs = trial, metric, 0

    def on_epoch_end(self, epoch: int, model, metrics: dict[str, float]) -> None:
        self.epochs = epoch
        value = metrics[self.metric]
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"{self.metric} {value:.4f} at epoch {epoch}")


@dataclass
class Objective:
    base: TrainConfig
    space: SearchSpace
    data: Any                      # aetrack.data.Splits, loaded once per worker
    metric: str
    tracking: Any                  # aetrack.tracking.TrackingOptions for the children
    parent_run_id: str
    registered_model: str | None   # None: register nothing
    data_dir: str | None = None
    threads: int = 0               # torch threads per trial; 0: shared_threads(), decided anew for each trial

    def __call__(self, trial: optuna.Trial) -> float:
        config = self.space.sample(trial, self.base)
        retried = retry_of(trial)
        trial.set_user_attr("worker", WORKER)
        torch.set_num_threads(self.threads or shared_threads(trial.study))
        marks = {tags.OPTUNA_STUDY: trial.study.study_name, tags.OPTUNA_TRIAL: str(trial.number),
                 tags.OPTUNA_STATE: "running", tags.OPTUNA_METRIC: self.metric, tags.WORKER: WORKER}
        if retried is not None:
            marks[tags.OPTUNA_RETRY_OF] = str(retried)
        report = ReportEpochs(trial, self.metric)
        options = dataclasses.replace(self.tracking, run_name=trial_name(trial.number, trial.params), register=False,
                                      registered_model=None)
        try:
            result = train_tracked(config, self.data, options, data_dir=self.data_dir, progress=False,
                                   callbacks=(report,), parent_run_id=self.parent_run_id, tags=marks)
            value = result.history.epochs[result.history.best_epoch - 1][self.metric]
            if not math.isfinite(value):
                raise FloatingPointError(f"{self.metric} is {value}")
            self._record(trial, result, value)
        except KeyboardInterrupt:  # a signal: train_tracked has closed the trial's run as KILLED
            retry_later(trial)
            raise
        except BaseException as err:
            pruned = isinstance(err, optuna.TrialPruned)
            if not pruned:
                trial.set_user_attr("error", f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}")
            self._close_child(trial, "pruned" if pruned else "failed")
            raise
        finally:
            trial.set_user_attr("epochs", report.epochs)
        return value

    def _record(self, trial: optuna.Trial, result, value: float) -> None:
        client = mlflow.MlflowClient()
        trial.set_user_attr("mlflow_run_id", result.run_id)
        client.log_metric(result.run_id, "objective", value)
        if self.registered_model and at_least_as_good(trial.study, value):
            # Only a trial that is the best so far registers, in its own process: the study's best always has
            # a version, the registry holds the chain of improvements, and no two workers register one trial.
            uri = result.logged_model_uri or result.model_uri
            version = str(mlflow.register_model(uri, self.registered_model, tags={
                tags.OPTUNA_STUDY: trial.study.study_name, tags.OPTUNA_TRIAL: str(trial.number)}).version)
            run = client.get_run(result.run_id)  # the version's tags and description, as `aetrack train` writes them
            describe_version(client, self.registered_model, version, run, run.data.tags.get(describe.NOTE, ""))
            trial.set_user_attr("registered_version", version)
            client.set_tag(result.run_id, tags.REGISTERED_VERSION, version)
        client.set_tag(result.run_id, tags.OPTUNA_STATE, "complete")

    def _close_child(self, trial: optuna.Trial, state: str) -> None:
        client = mlflow.MlflowClient()
        experiment_id = client.get_run(self.parent_run_id).info.experiment_id
        runs = client.search_runs([experiment_id], f"tags.`{tags.PARENT_RUN_ID}` = '{self.parent_run_id}' and "
                                                   f"tags.{tags.OPTUNA_TRIAL} = '{trial.number}'")
        if not runs:  # the trial failed before its run started
            return
        run = runs[0]
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        client.set_tag(run.info.run_id, tags.OPTUNA_STATE, state)
        client.set_terminated(run.info.run_id, "KILLED" if state == "pruned" else "FAILED")
        # A trial is never resumed (the study retries it as a new trial): its checkpoint is of no use.
        shutil.rmtree(checkpoints.path_for(self.tracking.checkpoint_dir, run.info.run_id).parent, ignore_errors=True)


def trial_name(number: int, params: dict) -> str:
    """`trial 3: latent_dim=12 lr=0.0031 prior=mog`: what the trial tries, in the runs table and on its cards."""
    tried = " ".join(f"{k}={v:.2g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    return f"trial {number}: {tried}" if tried else f"trial {number}"


def shared_threads(study: optuna.Study) -> int:
    """This machine's cores shared among this study's workers on it that are running a trial, this one included.

    Torch takes every core by default, and workers that each do so wait on each other's threads."""
    running = {t.user_attrs.get("worker") for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    here = {worker for worker in running if worker and worker.rsplit(":", 1)[0] == HOST} | {WORKER}
    return max(1, len(os.sched_getaffinity(0)) // len(here))


def at_least_as_good(study: optuna.Study, value: float) -> bool:
    done = [t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not done:
        return True
    return value <= min(done) if study.direction == optuna.study.StudyDirection.MINIMIZE else value >= max(done)
