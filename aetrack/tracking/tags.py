"""Every MLflow tag key aetrack writes or reads, once. A tag's key is a constant here; code elsewhere
never spells one out, so that a writer and a reader cannot disagree (as `aetrack_role` and
`aetrack.kind` once did, listing a study's parent run in `compare`)."""

from __future__ import annotations

# What a run is. Training runs have no kind; every other run aetrack makes says what it is.
KIND = "aetrack.kind"
KIND_STUDY = "study"                        # a tuning study's parent run
KIND_COMPARISON = "comparison"              # holds a compare report
KIND_REFERENCE = "reference-classifier"     # trains and registers a reference classifier
NOT_TRAINING = (KIND_STUDY, KIND_COMPARISON, KIND_REFERENCE)
# Written on a study's parent run since the first tuning release; still written and read for existing stores.
ROLE = "aetrack_role"

# A training run.
MODEL, DATASET, MODEL_FAMILY = "model", "dataset", "model_family"
VERSION, GIT_COMMIT = "aetrack_version", "git_commit"
STOPPED_EARLY = "stopped_early"
RESOLVED = "aetrack.resolved.{}"  # what an `auto` setting resolved to: aetrack.resolved.epochs
REGISTERED_VERSION = "registered_version"
# Which process runs it (to close runs a dead process left RUNNING), how it ended, what went wrong on the way.
HOST, PID, PID_STARTED = "aetrack.host", "aetrack.pid", "aetrack.pid_started"
HEARTBEAT = "aetrack.heartbeat"  # Unix seconds of the run's last sign of life: runs of any host are closed on it
END_REASON, RESUMED, WARNINGS = "aetrack.end_reason", "aetrack.resumed_at_epochs", "aetrack.warnings"

# `aetrack study`: which study and setting a run belongs to, and whether it was evaluated.
STUDY, SETTING, EVALUATED = "aetrack.study", "aetrack.setting", "aetrack.evaluated"

# A comparison run (in the experiment `<experiment>-comparisons`).
COMPARED_RUNS, COMPARED_EXPERIMENT = "compared_runs", "compared_experiment"

# Tuning: the parent run, and each trial's child run.
OPTUNA_STUDY, OPTUNA_STORAGE, OPTUNA_METRIC = "optuna_study", "optuna_storage", "optuna_metric"
OPTUNA_TRIAL, OPTUNA_STATE, OPTUNA_RETRY_OF = "optuna_trial", "optuna_state", "optuna_retry_of"
OPTUNA_TRIALS, BEST_TRIAL, BEST_PARAM = "optuna_trials", "best_trial", "best.{}"
WORKER, PARENT_RUN = "aetrack_worker", "aetrack_parent_run"
CHAMPION_MODEL, CHAMPION_VERSION = "champion_model", "champion_version"
CHAMPION_CROWNED, BEST_REGISTERED_VERSION = "champion_crowned", "best_registered_version"
PARENT_RUN_ID = "mlflow.parentRunId"  # MLflow's own

# Registered model versions.
RECIPE, TEST_ACCURACY = "recipe", "test_accuracy"


def study_parent(study_name: str) -> dict[str, str]:
    """The tags that mark a tuning study's parent run."""
    return {KIND: KIND_STUDY, ROLE: KIND_STUDY, OPTUNA_STUDY: study_name}


def is_training_run(tags: dict[str, str]) -> bool:
    return tags.get(KIND) not in NOT_TRAINING and tags.get(ROLE) != KIND_STUDY
