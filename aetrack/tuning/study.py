"""One tuning worker: `tune_study` joins (or starts) a study, claims its one parent run, takes trials until the
study holds its budget, and on its way out logs the study and crowns the champion.

Two things must hold whatever the number of workers, and both go through the storage's own transactions
(tuning/storage.py): exactly `n_trials` trials are created in total, and one parent run is chosen,
whichever worker starts first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Callable

import mlflow
import optuna
from optuna.trial import TrialState

from aetrack.config import ConfigError, TrainConfig, TuneConfig
from aetrack.models import REGISTRY
from aetrack.tracking import describe, lifecycle, tags
from aetrack.tracking.run import TrackingOptions, git_commit, registered_name, run_params
from aetrack.tuning import TuningError
from aetrack.tuning.objective import WORKER, Objective
from aetrack.tuning.report import (CHAMPION, FAILURES_IN_A_ROW, STATE_WORDS, Crowning, TrialLines, best_trial, crown_best,
                                   log_study, reconcile_children, set_tags, summary_table)
from aetrack.tuning.space import SearchSpace, available_metrics, default_metric
from aetrack.tuning.storage import StudyStorage, TrialBudgetSpent, open_storage, redact, used_trials

PARENT_RUN_KEY = "mlflow_parent_run_id"  # study user attribute: the MLflow run every trial is a child of
OBJECTIVE_KEY = "aetrack_objective"      # study user attribute: what the study optimises, to catch mismatched workers


def no_interrupt_traceback(record: logging.LogRecord) -> bool:
    """Optuna logs a stopped trial with its traceback; a signal is not a failure worth one."""
    return not (record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt))


TUNING_SUFFIX = "-tuning"


def tuning_experiment(experiment: str) -> str:
    """Where `aetrack tune` puts a study unless told: `aetrack-tuning` beside `aetrack`. A trial's few epochs would
    otherwise overlay the training runs in every chart of their experiment; the champion is shared all the same."""
    return experiment + TUNING_SUFFIX


def tuning_description(name: str) -> str:
    return (f"Optuna studies of `aetrack tune`: a parent run per study, a child run per trial, named by what it tries "
            f"(`trial 3: latent_dim=12 lr=0.0031`). The best trial's model is registered and becomes "
            f"`@champion` only when it beats every version of the model on the study's metric.  \n"
            + describe.CHART_SECTIONS)


def tune_study(base: TrainConfig, space: SearchSpace, tune: TuneConfig, *, data_dir: str | None = None,
               download: bool = False, tracking: TrackingOptions = TrackingOptions(), registered_model: str | None = None,
               echo: Callable[[str], None] = print, summary: Callable[[str], None] = print,
               reuse_run_id: str | None = None) -> optuna.Study:
    """One worker of the study `--study-name` (default: `registered_name(base)`): the whole of `aetrack tune` after option parsing.
    MLflow's tracking URI is the caller's to set; `reuse_run_id` is the run `mlflow run -e tune` made (its
    MLFLOW_RUN_ID, which the CLI reads): it becomes the study's parent when it is the first."""
    import aetrack
    from aetrack import data as datasets

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial comes from TrialLines instead
    for handler in logging.getLogger("optuna").handlers:  # a signal is said in one line by the CLI, not a traceback
        handler.addFilter(no_interrupt_traceback)
    variant = REGISTRY[base.model]
    metric, study_name = tune.metric or default_metric(variant), tune.study_name or registered_name(base)
    n_trials = tune.n_trials or (space.size() if tune.sampler == "grid" else 20)
    if tune.sampler == "grid":
        n_trials = min(n_trials, space.size())  # a grid has no more distinct trials
    data = datasets.load_for(base, data_dir=data_dir, download=download)
    try:
        datasets.check_fits(base, data)
    except ConfigError as err:  # a search that cannot start: tune's own error, as before
        raise TuningError(str(err)) from None
    base = base.resolve(len(data.train_y))  # every trial gets the same epoch budget, also for the pruner
    if metric not in (known := available_metrics(base, data)):
        raise TuningError(f"--metric {metric}: --model {base.model} reports {', '.join(known)}")

    storage = open_storage(tune.storage, budget=n_trials, heartbeat=tune.heartbeat, grace_period=tune.stale_after,
                           max_retry=tune.max_retry)
    study = optuna.create_study(study_name=study_name, storage=storage, direction=tune.direction, load_if_exists=True,
                                sampler=make_sampler(tune.sampler, space, tune.sampler_seed),
                                pruner=make_pruner(tune.pruner, base.epochs, tune.pruner_startup_trials,
                                                   tune.pruner_warmup_epochs))
    study_id = storage.get_study_id_from_name(study_name)
    wanted = {"model": base.model, "dataset": base.dataset, "metric": metric, "direction": tune.direction}
    recorded = storage.claim_study_user_attr(study_id, OBJECTIVE_KEY, wanted)
    if recorded != wanted:
        differ = ", ".join(f"{k} {recorded.get(k)} (not {v})" for k, v in wanted.items() if recorded.get(k) != v)
        raise TuningError(f"study {study_name} tunes {differ}; use the same options or another --study-name")

    client = mlflow.MlflowClient()
    experiment_id = (client.get_run(reuse_run_id).info.experiment_id if reuse_run_id
                     else describe.open_experiment(client, tracking.experiment, tuning_description(tracking.experiment)))
    marks = {**tags.study_parent(study_name), tags.OPTUNA_STORAGE: redact(tune.storage), tags.MODEL: base.model,
             tags.DATASET: base.dataset, tags.OPTUNA_METRIC: metric, tags.VERSION: aetrack.__version__,
             **({tags.GIT_COMMIT: commit} if (commit := git_commit()) else {})}
    params = {**{k: v for k, v in run_params(base).items() if k not in {p.name for p in space.params}},
              "n_trials": str(n_trials), "sampler": tune.sampler, "pruner": tune.pruner, "metric": metric,
              "direction": tune.direction, "study_name": study_name, "search_space": json.dumps(space.as_dict())}
    lifecycle.close_dead_runs(experiment_id, echo)  # trials of workers that died (on any host) end FAILED
    parent_run_id, created = claim_parent_run(client, study, storage, experiment_id=experiment_id,
                                              run_name=tracking.run_name, tags=marks, params=params,
                                              reuse_run_id=reuse_run_id)
    try:
        parent = client.get_run(parent_run_id).info
    except Exception as err:  # noqa: BLE001
        raise TuningError(f"study {study_name}'s parent run {parent_run_id} is not on {mlflow.get_tracking_uri()} "
                          f"({type(err).__name__}); start every worker with the same --tracking-uri") from None
    if parent.status != "RUNNING":
        client.update_run(parent_run_id, status="RUNNING")

    done = used_trials(study.get_trials(deepcopy=False))
    echo(f"study {study_name} on {redact(tune.storage)}: {done} of {n_trials} trials taken; "
         f"worker {WORKER} joins ({tune.sampler} sampler, {tune.pruner} pruner, {tune.direction} {metric})")
    echo(f"parent run {parent_run_id} ({'created' if created else 'shared'}) in experiment {parent.experiment_id} "
         f"at {mlflow.get_tracking_uri()}")
    children = dataclasses.replace(tracking, run_name=None, register=False, registered_model=None)
    objective = Objective(base, space, data, metric, children, parent_run_id, registered_model, data_dir, tune.threads)
    lines = TrialLines(metric, base.epochs, parent_run_id, echo)
    try:
        run_worker(study, objective, lines, timeout=tune.timeout or None, poll=min(tune.heartbeat, 2), echo=echo)
    finally:
        mlflow.flush_async_logging()
        finish(client, study, parent_run_id, space, metric, n_trials, registered_model, summary)
    return study


def finish(client, study: optuna.Study, parent_run_id: str, space: SearchSpace, metric: str, n_trials: int,
           registered_model: str | None, summary: Callable[[str], None]) -> Crowning | None:
    """What every worker does on its way out: fix dead workers' children, log the study on the parent,
    crown the champion, print the summary; the parent is FINISHED once the whole study is."""
    parent = client.get_run(parent_run_id).info
    reconcile_children(client, study, {"run_id": parent_run_id, "experiment_id": parent.experiment_id})
    log_study(client, study, parent_run_id, space, metric)
    outcome = crown_best(client, study, registered_model, metric) if registered_model else None
    if outcome is not None:
        set_tags(client, parent_run_id, {tags.CHAMPION_MODEL: outcome.model, tags.CHAMPION_VERSION: outcome.version,
                                         tags.CHAMPION_CROWNED: str(outcome.crowned).lower(),
                                         tags.BEST_REGISTERED_VERSION: outcome.candidate})
    complete = study_finished(study, n_trials)
    if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        client.set_terminated(parent_run_id, "FINISHED")  # a worker that joins later sets it RUNNING again
    trials = study.get_trials(deepcopy=False)
    counts = ", ".join(f"{sum(t.state == s for t in trials)} {w}" for s, w in STATE_WORDS.items() if any(t.state == s for t in trials))
    summary(f"\nstudy {study.study_name}: {counts}{'' if complete else ' (other workers still running, or stopped early)'}")
    summary(summary_table(study, metric))
    best = best_trial(study)
    if best is not None:
        summary(f"\nbest trial:  #{best.number}  {metric} {best.value:.4f}  run {best.user_attrs.get('mlflow_run_id', '-')}")
    if outcome is not None:
        if outcome.crowned:
            summary(f"champion:    models:/{outcome.model}@{CHAMPION} -> version {outcome.version}"
                    + (f" (was version {outcome.previous})" if outcome.previous and outcome.previous != outcome.version else ""))
        else:
            summary(f"champion:    models:/{outcome.model}@{CHAMPION} stays version {outcome.version} "
                    f"(this study's best, version {outcome.candidate}: {outcome.note})")
    uri, page = mlflow.get_tracking_uri(), describe.ui_page(parent.experiment_id, parent_run_id)
    look = f"{uri}/{page}" if uri.startswith("http") else f"mlflow ui --backend-store-uri {uri}   (then open {page})"
    summary(f"parent run:  {parent_run_id}\nlook at it:  {look}")
    return outcome


def claim_parent_run(client, study: optuna.Study, storage: StudyStorage, *, experiment_id: str, run_name: str | None,
                     tags: dict[str, str], params: dict[str, str], reuse_run_id: str | None = None) -> tuple[str, bool]:
    """The study's parent run and whether this worker created it. The first worker's candidate wins through
    the storage; a losing candidate is deleted (or, when `mlflow run` made it, pointed at the winner)."""
    from mlflow.entities import Param as MlflowParam, RunTag

    study_id = storage.get_study_id_from_name(study.study_name)
    existing = storage.get_study_user_attrs(study_id).get(PARENT_RUN_KEY)
    if existing:
        return existing, False
    candidate = reuse_run_id or client.create_run(experiment_id, run_name=run_name or f"study {study.study_name}").info.run_id
    winner = storage.claim_study_user_attr(study_id, PARENT_RUN_KEY, candidate)
    if winner != candidate:
        if reuse_run_id:
            client.set_tag(candidate, tags.PARENT_RUN, winner)
        else:
            client.delete_run(candidate)
        return winner, False
    logged = client.get_run(candidate).data.params if reuse_run_id else {}  # `mlflow run` logged its -P values
    client.log_batch(candidate, params=[MlflowParam(k, v) for k, v in params.items() if k not in logged],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    return winner, True


def run_worker(study: optuna.Study, objective: Objective, lines: TrialLines, *, timeout: float | None,
               poll: float, echo: Callable[[str], None]) -> None:
    """Take trials until the study holds its budget and none is left unfinished (a dead worker's trial is
    failed by its stale heartbeat and retried here), or until `timeout` seconds have passed."""
    started = time.monotonic()
    said_waiting = False
    while timeout is None or time.monotonic() - started < timeout:
        try:
            study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[lines])
        except TrialBudgetSpent:
            unfinished = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
            if not unfinished:
                return
            if not said_waiting:
                echo(f"all trials taken; waiting for {len(unfinished)} unfinished trial(s) of other workers")
                said_waiting = True
            time.sleep(poll)
            continue
        if len(lines.failures) >= FAILURES_IN_A_ROW:
            raise TuningError(f"{FAILURES_IN_A_ROW} trials in a row failed, the last with {lines.failures[-1] or 'an error'}")


def study_finished(study: optuna.Study, budget: int) -> bool:
    trials = study.get_trials(deepcopy=False)
    return used_trials(trials) >= budget and not any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)


def make_sampler(name: str, space: SearchSpace, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        import importlib.util

        if importlib.util.find_spec("cmaes") is None:
            raise TuningError("--sampler cmaes needs the cmaes package (pip install cmaes)")
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    # constant_liar: running trials of other workers count as bad guesses, so workers do not all sample one spot.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def make_pruner(name: str, epochs: int, startup_trials: int, warmup_epochs: int) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()
