"""Hyperparameter searches with Optuna, tracked in MLflow: `aetrack tune`.

One study lives in an SQL database (SQLite by default, PostgreSQL to spread it over
machines); any number of workers run the same command against it. Each trial is one
`train_tracked` run, a child of the study's parent run, with the objective reported
every epoch so that the pruner can stop it. At the end the best trial's model gets
the registry alias `champion` when it beats the current one.

Two things must hold whatever the number of workers, and both go through the
storage's own transactions (see StudyStorage): exactly `--n-trials` trials are
created in total, and one parent run is chosen, whichever worker starts first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import socket
import time
import typing
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import optuna
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._rdb import models as rdb  # the schema is stable since Optuna 3; StudyStorage needs its tables
from optuna.trial import FrozenTrial, TrialState

from aetrack.config import TrainConfig, _parse
from aetrack.models import REGISTRY, Variant

HINTS = typing.get_type_hints(TrainConfig)
WORKER = f"{socket.gethostname()}:{os.getpid()}"
CHAMPION = "champion"
PARENT_RUN_KEY = "mlflow_parent_run_id"  # study user attribute: the MLflow run every trial is a child of
OBJECTIVE_KEY = "aetrack_objective"      # study user attribute: what the study optimises, to catch mismatched workers
DEFAULT_STORAGE = "sqlite:///optuna.db"
STATE_WORDS = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
               TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}
FAILURES_IN_A_ROW = 3  # a worker whose trials keep failing stops, rather than spend the budget on failures

# Settings a search may not vary: they change the data, the validation split or the budget of a trial,
# so that objective values would stop being comparable (or they do not change the model at all).
FIXED_ONLY = ("model", "dataset", "binarize", "val_fraction", "seed", "epochs", "device", "log_every", "patience")


class TuningError(Exception):
    """A search that cannot go on; str(err) is one line."""


class SpaceError(TuningError, ValueError):
    """A search-space spec that cannot be used."""


# ----------------------------------------------------------------------------------------------------------------
# Search spaces: `name=int:LOW:HIGH[:log|:STEP]`, `name=float:LOW:HIGH[:log|:STEP]`, `name=cat:A,B,...`.
# Sizes of a tuple setting (`hidden`) are joined by "-" inside one choice: `hidden=cat:128,256-128`.

SPEC_HELP = "expected int:LOW:HIGH[:log|:STEP], float:LOW:HIGH[:log|:STEP] or cat:A,B,..."


@dataclass(frozen=True)
class Param:
    name: str
    kind: str                                   # "int", "float" or "cat"
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    when: tuple[str, tuple] | None = None       # (other setting, its values): only searched then

    @property
    def spec(self) -> str:
        if self.kind == "cat":
            return "cat:" + ",".join(str(c) for c in self.choices)
        tail = ":log" if self.log else f":{_number(self.step)}" if self.step else ""
        return f"{self.kind}:{_number(self.low)}:{_number(self.high)}{tail}"

    def suggest(self, trial: optuna.Trial):
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        return trial.suggest_categorical(self.name, list(self.choices))

    def extremes(self) -> list:
        return list(self.choices) if self.kind == "cat" else [self.low, self.high]


def config_value(name: str, value):
    """A sampled value as the config field holds it ("256-128" -> (256, 128))."""
    if typing.get_origin(HINTS[name]) is tuple:
        return tuple(int(part) for part in str(value).split("-"))
    return _parse(HINTS[name], value) if isinstance(value, str) else HINTS[name](value)


def parse_param(name: str, spec, when: tuple | None = None) -> Param:
    """One `NAME=SPEC` (or a YAML list of choices) -> Param; SpaceError says what is wrong in one line."""
    name = name.strip().replace("-", "_")
    if name not in HINTS:
        raise SpaceError(f"unknown parameter {name!r}; searchable: {', '.join(n for n in HINTS if n not in FIXED_ONLY)}")
    if name in FIXED_ONLY:
        raise SpaceError(f"{name} cannot be searched (it changes the data, the split or a trial's budget); "
                         f"set it with --{name.replace('_', '-')}")
    hint, meta = HINTS[name], TrainConfig.__dataclass_fields__[name].metadata
    if isinstance(spec, (list, tuple)):
        kind, rest = "cat", ",".join("-".join(map(str, c)) if isinstance(c, (list, tuple)) else str(c) for c in spec)
    else:
        kind, _, rest = str(spec).strip().partition(":")
    shown = f"{name}={spec}"
    if kind == "cat":
        raw = [c.strip() for c in rest.split(",") if c.strip()]
        if not raw:
            raise SpaceError(f"{shown}: cat needs at least one choice")
        choices = []
        for text in raw:
            try:
                choices.append(_choice(hint, text))
                config_value(name, choices[-1])
            except ValueError:
                raise SpaceError(f"{shown}: {text!r} is not a valid {name} ({_type_name(hint)})") from None
        choices = tuple(choices)
        if meta["choices"] and (bad := [c for c in choices if c not in meta["choices"]]):
            raise SpaceError(f"{shown}: {bad[0]!r} is not one of {', '.join(meta['choices'])}")
        return Param(name, "cat", choices=choices, when=when)
    if kind not in ("int", "float"):
        raise SpaceError(f"{shown}: {SPEC_HELP}")
    if hint is not {"int": int, "float": float}[kind]:
        use = f"{hint.__name__}:LOW:HIGH" if hint in (int, float) else "cat:A,B,..."
        raise SpaceError(f"{shown}: {name} takes {_type_name(hint)}; use {use}")
    parts = rest.split(":")
    number = int if kind == "int" else float
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        low, high = number(parts[0]), number(parts[1])
        log = len(parts) == 3 and parts[2] == "log"
        step = number(parts[2]) if len(parts) == 3 and not log else None
    except ValueError:
        raise SpaceError(f"{shown}: {SPEC_HELP}") from None
    if low > high:
        raise SpaceError(f"{shown}: LOW is above HIGH")
    if log and low <= 0:
        raise SpaceError(f"{shown}: a log scale needs LOW > 0")
    if step is not None and step <= 0:
        raise SpaceError(f"{shown}: STEP must be positive")
    return Param(name, kind, low, high, log, step, when=when)


def _choice(hint, text: str):
    if typing.get_origin(hint) is tuple:
        return "-".join(str(int(size)) for size in text.replace("x", "-").split("-"))
    return _parse(hint, text)


def _type_name(hint) -> str:
    return "sizes joined by -" if typing.get_origin(hint) is tuple else getattr(hint, "__name__", str(hint))


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# The default spaces: what applies to every variant, then one block per option group (Variant.scopes).
DEFAULT_SPACE = {"lr": "float:1e-4:1e-2:log", "latent_dim": "int:2:32:log"}
HIDDEN_CHOICES = {"mlp": "cat:128,256-128,512-256", "conv": "cat:16-32,32-64,64-128"}
SCOPE_SPACES = {
    "variational": {"beta": "float:0.25:2:log", "prior": "cat:normal,mog,vamp", "prior_components": "int:2:20"},
    "noise": {"noise_level": "float:0.05:0.5"},
    "sparsity": {"sparsity_weight": "float:1e-5:1e-1:log"},
    "contractive": {"contractive_weight": "float:1e-4:1:log"},
    "semi_supervised": {"classifier_weight": "float:0.01:1:log"},
}
CONDITIONS = {"prior_components": ("prior", ("mog", "vamp"))}
# `--sampler grid`: "try several latent sizes and architectures".
GRID_SPACE = {"latent_dim": "cat:2,4,8,16,32"}


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]

    def sample(self, trial: optuna.Trial, base: TrainConfig) -> TrainConfig:
        chosen: dict[str, Any] = {}
        for param in self.params:
            if param.when and chosen.get(param.when[0], getattr(base, param.when[0])) not in param.when[1]:
                continue
            chosen[param.name] = config_value(param.name, param.suggest(trial))
        return dataclasses.replace(base, **chosen)

    def grid(self) -> dict[str, list]:
        """GridSampler's space; every parameter must be a list of choices."""
        ranges = [p for p in self.params if p.kind != "cat"]
        if ranges:
            raise SpaceError(f"--sampler grid needs cat:A,B,... for every parameter, got {ranges[0].name}={ranges[0].spec}")
        return {p.name: list(p.choices) for p in self.params}

    def size(self) -> int:
        return math.prod(len(p.choices) for p in self.params) if all(p.kind == "cat" for p in self.params) else 0

    def as_dict(self) -> dict[str, str]:
        return {p.name: p.spec for p in self.params}

    def to_yaml(self) -> str:
        lines = []
        for p in self.params:
            note = f"  # only when {p.when[0]} is {' or '.join(p.when[1])}" if p.when else ""
            lines.append(f"{p.name}: {p.spec}{note}")
        return "\n".join(lines)


def default_space(variant: Variant, base: TrainConfig, grid: bool = False) -> dict[str, str]:
    specs = {**DEFAULT_SPACE, "hidden": HIDDEN_CHOICES[base.arch]}
    for scope in sorted(variant.scopes):
        specs.update(SCOPE_SPACES.get(scope, {}))
    return {**GRID_SPACE, "hidden": HIDDEN_CHOICES[base.arch]} if grid else specs


def build_space(variant: Variant, base: TrainConfig, *, overrides: dict | None = None, fixed: set[str] = frozenset(),
                grid: bool = False) -> SearchSpace:
    """The default space less the settings fixed on the command line, with `overrides` (None removes a name)."""
    specs: dict[str, Any] = {k: v for k, v in default_space(variant, base, grid).items() if k not in fixed}
    for name, spec in (overrides or {}).items():
        name = name.strip().replace("-", "_")
        if name in fixed:
            raise SpaceError(f"{name} is both fixed by --{name.replace('_', '-')} and searched by --param; drop one")
        if spec is None:
            specs.pop(name, None)
            continue
        scope = TrainConfig.__dataclass_fields__[name].metadata["scope"] if name in HINTS else None
        if scope and scope not in variant.scopes:
            raise SpaceError(f"{name} does not apply to --model {variant.name}")
        specs[name] = spec
    params = [parse_param(name, spec, CONDITIONS.get(name)) for name, spec in specs.items()]
    # A conditional setting whose condition is fixed to a value that excludes it is not searched at all.
    return SearchSpace(tuple(p for p in params if not p.when or p.when[0] in specs or getattr(base, p.when[0]) in p.when[1]))


def parse_param_options(items: tuple[str, ...]) -> dict[str, str]:
    """`--param NAME=SPEC` (repeatable; ';' separates several in one value, as MLproject passes them)."""
    overrides = {}
    for item in items:
        for pair in filter(None, (part.strip() for part in item.split(";"))):
            name, sep, spec = pair.partition("=")
            if not sep or not name.strip():
                raise SpaceError(f"--param expects NAME=SPEC, got {pair!r}")
            overrides[name.strip()] = spec.strip()
    return overrides


def load_space_file(path: str) -> dict:
    """A YAML mapping NAME: SPEC (or a list of choices; null drops a default)."""
    import yaml

    try:
        with open(path) as handle:
            content = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError) as err:
        raise SpaceError(f"cannot read the search space file {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(content, dict):
        raise SpaceError(f"{path}: expected a mapping NAME: SPEC, e.g. 'latent_dim: int:2:64:log'")
    return {str(k): v for k, v in content.items()}


def default_metric(variant: Variant) -> str:
    """The validation loss that suits the model: classifier error for M2, negative ELBO for VAEs, else reconstruction."""
    if variant.semi_supervised:
        return "val_error"
    return "val_neg_elbo" if variant.generative else "val_recon_loss"


def available_metrics(config: TrainConfig, data) -> list[str]:
    """The validation metrics a model reports, from one forward pass on two examples."""
    import torch

    from aetrack.models import build_model

    with torch.no_grad():
        out = build_model(config, data.shape, data.num_classes).to(data.val_x.device)(data.val_x[:2], data.val_y[:2])
    return ["val_loss", *(f"val_{name}" for name in out.parts)]


# ----------------------------------------------------------------------------------------------------------------
# The study's storage.

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


# ----------------------------------------------------------------------------------------------------------------
# Trials: one child run each, reporting to Optuna every epoch.

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
    storage: StudyStorage
    registered_model: str | None   # None: register nothing
    data_dir: str | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        from aetrack.tracking import train_tracked

        config = self.space.sample(trial, self.base)
        retry_of = self.storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
        trial.set_user_attr("worker", WORKER)
        tags = {"optuna_study": trial.study.study_name, "optuna_trial": str(trial.number), "optuna_state": "running",
                "optuna_metric": self.metric, "aetrack_worker": WORKER}
        if retry_of is not None:
            tags["optuna_retry_of"] = str(retry_of)
        report = ReportEpochs(trial, self.metric)
        options = dataclasses.replace(self.tracking, run_name=f"trial {trial.number}", register=False, registered_model=None)
        try:
            result = train_tracked(config, self.data, options, data_dir=self.data_dir, progress=False,
                                   callbacks=(report,), parent_run_id=self.parent_run_id, tags=tags)
            value = result.history.epochs[result.history.best_epoch - 1][self.metric]
            if not math.isfinite(value):
                raise FloatingPointError(f"{self.metric} is {value}")
            self._record(trial, result, value)
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
        import mlflow

        client = mlflow.MlflowClient()
        trial.set_user_attr("mlflow_run_id", result.run_id)
        client.log_metric(result.run_id, "objective", value)
        if self.registered_model and at_least_as_good(trial.study, value):
            # Only a trial that is the best so far registers, in its own process: the study's best always has
            # a version, the registry holds the chain of improvements, and no two workers register one trial.
            logged = mlflow.last_logged_model()  # this trial's, logged a moment ago in this process
            uri = logged.model_uri if logged is not None and logged.source_run_id == result.run_id else result.model_uri
            version = str(mlflow.register_model(uri, self.registered_model, tags={
                "optuna_study": trial.study.study_name, "optuna_trial": str(trial.number), self.metric: f"{value:.6g}"}).version)
            trial.set_user_attr("registered_version", version)
            client.set_tag(result.run_id, "registered_version", version)
        client.set_tag(result.run_id, "optuna_state", "complete")

    def _close_child(self, trial: optuna.Trial, state: str) -> None:
        import mlflow

        run = mlflow.last_active_run()  # the child, unless the trial failed before its run started
        if run is None or run.data.tags.get("optuna_trial") != str(trial.number) or \
                run.data.tags.get("optuna_study") != trial.study.study_name:
            return
        client = mlflow.MlflowClient()
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        client.set_tag(run.info.run_id, "optuna_state", state)
        client.set_terminated(run.info.run_id, "KILLED" if state == "pruned" else "FAILED")


def at_least_as_good(study: optuna.Study, value: float) -> bool:
    done = [t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not done:
        return True
    return value <= min(done) if study.direction == optuna.study.StudyDirection.MINIMIZE else value >= max(done)


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no complete trial yet
        return None


# ----------------------------------------------------------------------------------------------------------------
# The parent run, the study summary and the champion.

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
            client.set_tag(candidate, "aetrack_parent_run", winner)
        else:
            client.delete_run(candidate)
        return winner, False
    logged = client.get_run(candidate).data.params if reuse_run_id else {}  # `mlflow run` logged its -P values
    client.log_batch(candidate, params=[MlflowParam(k, v) for k, v in params.items() if k not in logged],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    return winner, True


def reconcile_children(client, study: optuna.Study, parent: dict) -> int:
    """Child runs left RUNNING by a dead worker get their trial's final state; returns how many."""
    runs = client.search_runs([parent["experiment_id"]],
                              f"tags.mlflow.parentRunId = '{parent['run_id']}' and attributes.status = 'RUNNING'")
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    fixed = 0
    for run in runs:
        trial = trials.get(int(run.data.tags.get("optuna_trial", -1)))
        if trial is not None and trial.state.is_finished():
            client.set_tag(run.info.run_id, "optuna_state", STATE_WORDS[trial.state])
            client.set_terminated(run.info.run_id, "FINISHED" if trial.state == TrialState.COMPLETE else "FAILED")
            fixed += 1
    return fixed


PLOTS = ("optimization_history", "intermediate_values", "param_importances", "parallel_coordinate")


def log_study(client, study: optuna.Study, parent_run_id: str, space: SearchSpace, metric: str) -> list[str]:
    """Summary, trials table, search space and Optuna's plots on the parent run; returns the plots logged."""
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as plots

    trials = study.get_trials(deepcopy=False)
    counts = {word: sum(t.state == state for t in trials) for state, word in STATE_WORDS.items()}
    metrics = {f"n_{word}": float(n) for word, n in counts.items() if word in ("complete", "pruned", "failed")}
    metrics["epochs_spent"] = float(sum(t.user_attrs.get("epochs", 0) for t in trials))
    best = best_trial(study)
    tags = {"optuna_trials": str(len(trials))}
    if best is not None:
        metrics["best_value"] = best.value
        tags.update({"best_trial": str(best.number), **{f"best.{k}": str(v) for k, v in best.params.items()}})
    for key, value in metrics.items():
        client.log_metric(parent_run_id, key, value)
    for key, value in tags.items():
        client.set_tag(parent_run_id, key, value)
    client.log_text(parent_run_id, summary_table(study, metric, limit=None), "study/summary.txt")
    client.log_dict(parent_run_id, space.as_dict(), "study/search_space.yaml")
    if trials:
        client.log_text(parent_run_id, study.trials_dataframe().to_csv(index=False), "study/trials.csv")
    logged = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in PLOTS:
            try:
                plot = getattr(plots, f"plot_{name}")
                axes = plot(study) if name == "intermediate_values" else plot(study, target_name=metric)
            except Exception:  # noqa: BLE001 - e.g. importances need two complete trials; the plot is skipped
                continue
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.set_size_inches(8, 5)
            client.log_figure(parent_run_id, figure, f"plots/{name}.png", save_kwargs={"bbox_inches": "tight"})
            plt.close(figure)
            logged.append(name)
    return logged


def run_score(client, run_id: str, metric: str) -> float | None:
    """A run's `metric` at its best epoch (what a trial's objective is); None when it did not log it."""
    run = client.get_run(run_id)
    if run.data.tags.get("optuna_metric") == metric and "objective" in run.data.metrics:
        return run.data.metrics["objective"]
    best_epoch = run.data.metrics.get("best_epoch")
    epochs = {m.step: m.value for m in client.get_metric_history(run_id, "epoch")}
    for m in client.get_metric_history(run_id, metric):
        if epochs.get(m.step) == best_epoch:
            return m.value
    return None


@dataclass(frozen=True)
class Crowning:
    model: str
    version: str          # the champion after the decision
    crowned: bool         # whether this study's best took (or already held) the alias
    candidate: str        # this study's best version
    value: float
    previous: str | None = None
    previous_value: float | None = None
    note: str = ""


def crown(client, model: str, version: str, value: float, metric: str, minimize: bool) -> Crowning:
    """Move the `champion` alias to `version` when it beats the current champion on `metric`."""
    from mlflow.exceptions import MlflowException

    score = None
    try:
        current = client.get_model_version_by_alias(model, CHAMPION)
    except MlflowException:
        current = None
    if current is not None and str(current.version) == version:
        return Crowning(model, version, True, version, value, version, value, "already champion")
    if current is not None:
        score = run_score(client, current.run_id, metric)
        if score is None:
            return Crowning(model, str(current.version), False, version, value, str(current.version), None,
                            f"the champion logged no {metric} to compare with; it stays")
        if not (value < score if minimize else value > score):
            return Crowning(model, str(current.version), False, version, value, str(current.version), score,
                            "the champion is at least as good; it stays")
    client.set_registered_model_alias(model, CHAMPION, version)
    return Crowning(model, version, True, version, value, None if current is None else str(current.version),
                    None if current is None else score)


def crown_best(client, study: optuna.Study, model: str, metric: str) -> Crowning | None:
    """Crown the study's best registered trial. Workers that finish together may crown from different views of
    the study; each re-reads the study after moving the alias, and the best one (it only improves) ends up there."""
    minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
    outcome = None
    for _ in range(3):
        best = best_trial(study)
        if best is None or "registered_version" not in best.user_attrs:
            return outcome
        outcome = crown(client, model, best.user_attrs["registered_version"], best.value, metric, minimize)
        if best_trial(study).number == best.number:
            return outcome
    return outcome


# ----------------------------------------------------------------------------------------------------------------
# The worker loop, progress lines and the summary.

def summary_table(study: optuna.Study, metric: str, limit: int | None = 15) -> str:
    """Trials best first (complete by value, then pruned, then the rest)."""
    minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
    order = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.RUNNING: 2, TrialState.WAITING: 3, TrialState.FAIL: 4}
    trials = sorted(study.get_trials(deepcopy=False),
                    key=lambda t: (order[t.state], (t.value if minimize else -t.value) if t.value is not None else 0, t.number))
    header = f"{'trial':>5}  {'state':<8}  {metric:>14}  {'epochs':>6}  {'seconds':>7}  params"
    lines = [header, "-" * len(header)]
    for t in trials[:limit]:
        value = f"{t.value:.4f}" if t.value is not None else "-"
        seconds = f"{t.duration.total_seconds():.1f}" if t.duration else "-"
        params = "  ".join(f"{k}={_short(v)}" for k, v in t.params.items())
        note = f"  (retry of #{t.system_attrs['failed_trial']})" if "failed_trial" in t.system_attrs else ""
        lines.append(f"{t.number:>5}  {STATE_WORDS[t.state]:<8}  {value:>14}  {t.user_attrs.get('epochs', '-'):>6}  "
                     f"{seconds:>7}  {params}{note}")
    if limit is not None and len(trials) > limit:
        lines.append(f"... and {len(trials) - limit} more (all of them: study/summary.txt on the parent run)")
    return "\n".join(lines)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class TrialLines:
    """Optuna callback: one line per finished trial, the best value on the parent run, and a stop after
    FAILURES_IN_A_ROW failures (a wrong tracking URI or a bad space would otherwise spend the budget)."""

    def __init__(self, metric: str, epochs: int, parent_run_id: str, echo: Callable[[str], None]):
        self.metric, self.epochs, self.parent_run_id, self.echo = metric, epochs, parent_run_id, echo
        self.failures: list[str] = []

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        import mlflow

        best = best_trial(study)
        value = f"{trial.value:.4f}" if trial.value is not None else "-"
        best_text = f"best {best.value:.4f} (#{best.number})" if best else "best -"
        seconds = trial.duration.total_seconds() if trial.duration else 0.0
        error = f"  {trial.user_attrs['error']}" if trial.state == TrialState.FAIL and "error" in trial.user_attrs else ""
        self.echo(f"trial {trial.number:>3}  {STATE_WORDS[trial.state]:<8}  {self.metric} {value:>9}  {best_text}  "
                  f"{trial.user_attrs.get('epochs', 0)}/{self.epochs} epochs  {seconds:.1f}s{error}")
        if best:
            mlflow.MlflowClient().log_metric(self.parent_run_id, "best_value", best.value, step=trial.number, synchronous=False)
        self.failures = self.failures + [error.strip()] if trial.state == TrialState.FAIL else []
        if len(self.failures) >= FAILURES_IN_A_ROW:
            study.stop()


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


SAMPLERS = ("tpe", "random", "cmaes", "grid")
PRUNERS = ("median", "hyperband", "none")


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


# ----------------------------------------------------------------------------------------------------------------
# `aetrack tune`. aetrack.cli imports `tune` from here at its end, so the command, which needs cli's helpers,
# is built on first access (PEP 562): importing this module first does not start an import cycle.

def __getattr__(name: str):
    if name == "tune":
        global tune
        tune = _tune_command()
        return tune
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _tune_command():
    import click

    from aetrack import cli

    @click.command()
    @cli.config_options
    @cli.apply(cli.data_options)
    @cli.apply(cli.tracking_options)
    @click.option("--register/--no-register", default=True, show_default=True,
                  help="Register the best trials' models and crown the champion.")
    @click.option("--registered-model", default=None, help="Registry name (default aetrack-<dataset>-<model>).")
    @click.option("--checkpoint-dir", default="checkpoints", show_default=True, help="Per-trial checkpoints (<dir>/<run id>/last.pt).")
    @click.option("--set", "settings", multiple=True, metavar="NAME=VALUE[,...]",
                  help="Fix training options by name (as MLproject passes them).")
    @click.option("--quiet", is_flag=True, help="No line per trial; only the summary.")
    @click.option("--n-trials", type=int, default=None, help="Trials in total over all workers  [default: 20; grid: its size]")
    @click.option("--timeout", type=float, default=None, help="This worker starts no trial after this many seconds.")
    @click.option("--study-name", default=None, help="Optuna study  [default: aetrack-<dataset>-<model>]")
    @click.option("--storage", default=DEFAULT_STORAGE, show_default=True, envvar="AETRACK_OPTUNA_STORAGE", show_envvar=True,
                  help="SQLAlchemy URL of the study's database; postgresql://user:pass@host/db for many machines.")
    @click.option("--sampler", type=click.Choice(SAMPLERS), default="tpe", show_default=True)
    @click.option("--sampler-seed", type=int, default=None, help="Seed of the sampler (give each worker its own).")
    @click.option("--pruner", type=click.Choice(PRUNERS), default="median", show_default=True)
    @click.option("--pruner-startup-trials", type=int, default=5, show_default=True,
                  help="Median pruner: trials completed before it prunes.")
    @click.option("--pruner-warmup-epochs", type=int, default=1, show_default=True,
                  help="Median pruner: epochs a trial runs before it can be pruned.")
    @click.option("--metric", default=None,
                  help="Validation metric to optimise  [default: val_error for m2, val_neg_elbo for VAEs, else val_recon_loss]")
    @click.option("--direction", type=click.Choice(["minimize", "maximize"]), default="minimize", show_default=True)
    @click.option("--param", "param_specs", multiple=True, metavar="NAME=SPEC",
                  help="Search NAME over SPEC: int:LOW:HIGH[:log|:STEP], float:LOW:HIGH[:log|:STEP] or cat:A,B,... (repeatable).")
    @click.option("--space", "space_file", default=None, help="YAML file of NAME: SPEC lines (null drops a default).")
    @click.option("--show-space", is_flag=True, help="Print the search space (as a --space file) and exit.")
    @click.option("--heartbeat", type=int, default=10, show_default=True, help="Seconds between a running trial's heartbeats.")
    @click.option("--grace-period", type=int, default=None,
                  help="Seconds without heartbeat before a trial counts as dead  [default: 2 x heartbeat]")
    @click.option("--max-retry", type=int, default=3, show_default=True, help="Retries of a dead worker's trial.")
    @click.option("--threads", type=int, default=0,
                  help="Torch CPU threads of this worker (0: torch's default); cores / workers on one machine.")
    @click.pass_context
    @cli.friendly_errors
    def tune(ctx, data_dir, download, tracking_uri, experiment, run_name, register, registered_model, checkpoint_dir,
             settings, quiet, n_trials, timeout, study_name, storage, sampler, sampler_seed, pruner, pruner_startup_trials,
             pruner_warmup_epochs, metric, direction, param_specs, space_file, show_space, heartbeat, grace_period,
             max_retry, threads, **values):
        """Search hyperparameters with Optuna; every trial is an MLflow child run, the best model becomes the champion.

        Start the same command several times (on one machine or many, with one --storage and one
        --tracking-uri) and the workers share the study until --n-trials trials are done in total.
        """
        data_dir, registered_model, metric, study_name = data_dir or None, registered_model or None, metric or None, study_name or None
        timeout = timeout or None
        settings = cli.parse_settings(settings)
        base = cli.config_from_options(ctx, values, settings)
        variant = REGISTRY[base.model]
        explicit = {f.name for f in dataclasses.fields(TrainConfig) if f.name in settings
                    or ctx.get_parameter_source(f.name) not in (click.core.ParameterSource.DEFAULT, None)}
        try:
            overrides = {**(load_space_file(space_file) if space_file else {}), **parse_param_options(param_specs)}
            space = build_space(variant, base, overrides=overrides, fixed=explicit, grid=sampler == "grid")
            if sampler == "grid":
                space.grid()
        except SpaceError as err:
            raise click.UsageError(str(err)) from None
        for param in space.params:
            for value in param.extremes():
                try:
                    cli.check(dataclasses.replace(base, **{param.name: config_value(param.name, value)}))
                except click.UsageError as err:
                    raise click.UsageError(f"--param {param.name}={param.spec}: {value} is impossible ({err.message})") from None
        if show_space:
            click.echo(f"# search space of --model {base.model} ({sampler} sampler); every other option is fixed")
            click.echo(space.to_yaml() or "# (empty: every searchable setting is fixed)")
            return
        if not space.params:
            raise click.UsageError("nothing to search: every parameter is fixed (see --show-space)")
        if n_trials is None or (sampler == "grid" and n_trials > space.size()):
            n_trials = space.size() if sampler == "grid" else 20  # a grid has no more distinct trials
        if n_trials < 1 or heartbeat < 1 or max_retry < 0:
            raise click.UsageError("--n-trials and --heartbeat must be at least 1, --max-retry at least 0")
        if grace_period is not None and grace_period <= heartbeat:
            raise click.UsageError("--grace-period must be longer than --heartbeat, or live trials count as dead")
        from aetrack.tracking import registered_name

        registered_model = (registered_model or registered_name(base)) if register else None
        try:
            tune_study(base, space, n_trials=n_trials, timeout=timeout, study_name=study_name or f"aetrack-{base.dataset}-{base.model}",
                       storage_url=storage, sampler=sampler, sampler_seed=sampler_seed, pruner=pruner,
                       pruner_startup_trials=pruner_startup_trials, pruner_warmup_epochs=pruner_warmup_epochs,
                       metric=metric, direction=direction, heartbeat=heartbeat, grace_period=grace_period or 2 * heartbeat,
                       max_retry=max_retry, threads=threads, data_dir=data_dir, download=download, tracking_uri=tracking_uri,
                       experiment=experiment, run_name=run_name, registered_model=registered_model,
                       checkpoint_dir=checkpoint_dir, echo=(lambda line: None) if quiet else click.echo, summary=click.echo)
        except TuningError as err:
            raise click.ClickException(str(err)) from None

    return tune


def tune_study(base: TrainConfig, space: SearchSpace, *, n_trials: int, study_name: str, storage_url: str = DEFAULT_STORAGE,
               timeout: float | None = None, sampler: str = "tpe", sampler_seed: int | None = None, pruner: str = "median",
               pruner_startup_trials: int = 5, pruner_warmup_epochs: int = 1, metric: str | None = None,
               direction: str = "minimize", heartbeat: int = 10, grace_period: int = 20, max_retry: int = 3,
               threads: int = 0, data_dir: str | None = None, download: bool = False, tracking_uri: str | None = None,
               experiment: str = "aetrack", run_name: str | None = None, registered_model: str | None = None,
               checkpoint_dir: str = "checkpoints", echo: Callable[[str], None] = print,
               summary: Callable[[str], None] = print) -> optuna.Study:
    """One worker of the study `study_name`: the whole of `aetrack tune` after option parsing."""
    import mlflow
    import torch

    import aetrack
    from aetrack import data as datasets
    from aetrack.tracking import TrackingOptions, git_commit
    from aetrack.training import resolve_device

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial comes from TrialLines instead
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if threads:
        torch.set_num_threads(threads)
    variant = REGISTRY[base.model]
    metric = metric or default_metric(variant)
    try:
        data = datasets.load(base.dataset, data_dir=data_dir, download=download, binarize=base.binarize,
                             val_fraction=base.val_fraction, seed=base.seed, device=resolve_device(base.device))
    except datasets.DataError as err:
        raise TuningError(str(err)) from None
    if variant.semi_supervised and base.labeled > len(data.train_x):
        raise TuningError(f"--labeled {base.labeled} is larger than the training set ({len(data.train_x)} examples)")
    base = base.resolve(len(data.train_x))  # every trial gets the same epoch budget, also for the pruner
    if metric not in (known := available_metrics(base, data)):
        raise TuningError(f"--metric {metric}: --model {base.model} reports {', '.join(known)}")

    storage = open_storage(storage_url, budget=n_trials, heartbeat=heartbeat, grace_period=grace_period, max_retry=max_retry)
    study = optuna.create_study(study_name=study_name, storage=storage, direction=direction, load_if_exists=True,
                                sampler=make_sampler(sampler, space, sampler_seed),
                                pruner=make_pruner(pruner, base.epochs, pruner_startup_trials, pruner_warmup_epochs))
    study_id = storage.get_study_id_from_name(study_name)
    wanted = {"model": base.model, "dataset": base.dataset, "metric": metric, "direction": direction}
    recorded = storage.claim_study_user_attr(study_id, OBJECTIVE_KEY, wanted)
    if recorded != wanted:
        differ = ", ".join(f"{k} {recorded.get(k)} (not {v})" for k, v in wanted.items() if recorded.get(k) != v)
        raise TuningError(f"study {study_name} tunes {differ}; use the same options or another --study-name")

    # `mlflow run -e tune` made a run: it becomes the parent (when first), and children must not resume it.
    reuse_run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    experiment_id = (client.get_run(reuse_run_id).info.experiment_id if reuse_run_id
                     else mlflow.set_experiment(experiment).experiment_id)
    tags = {"aetrack_role": "study", "optuna_study": study_name, "optuna_storage": redact(storage_url), "model": base.model,
            "dataset": base.dataset, "optuna_metric": metric, "aetrack_version": aetrack.__version__,
            **({"git_commit": commit} if (commit := git_commit()) else {})}
    params = {**{k: v for k, v in base.to_params().items() if k not in {p.name for p in space.params}},
              "n_trials": str(n_trials), "sampler": sampler, "pruner": pruner, "metric": metric, "direction": direction,
              "study_name": study_name, "search_space": json.dumps(space.as_dict())}
    parent_run_id, created = claim_parent_run(client, study, storage, experiment_id=experiment_id, run_name=run_name,
                                              tags=tags, params=params, reuse_run_id=reuse_run_id)
    try:
        parent = client.get_run(parent_run_id).info
    except Exception as err:  # noqa: BLE001
        raise TuningError(f"study {study_name}'s parent run {parent_run_id} is not on {mlflow.get_tracking_uri()} "
                          f"({type(err).__name__}); start every worker with the same --tracking-uri") from None
    if parent.status != "RUNNING":
        client.update_run(parent_run_id, status="RUNNING")

    done = used_trials(study.get_trials(deepcopy=False))
    echo(f"study {study_name} on {redact(storage_url)}: {done} of {n_trials} trials taken; "
         f"worker {WORKER} joins ({sampler} sampler, {pruner} pruner, {direction} {metric})")
    echo(f"parent run {parent_run_id} ({'created' if created else 'shared'}) in experiment {parent.experiment_id} "
         f"at {mlflow.get_tracking_uri()}")
    tracking = TrackingOptions(tracking_uri, experiment, None, False, None, checkpoint_dir)
    objective = Objective(base, space, data, metric, tracking, parent_run_id, storage, registered_model, data_dir)
    lines = TrialLines(metric, base.epochs, parent_run_id, echo)
    try:
        run_worker(study, objective, lines, timeout=timeout, poll=min(heartbeat, 2), echo=echo)
    finally:
        mlflow.flush_async_logging()
        finish(client, study, parent_run_id, space, metric, n_trials, registered_model, summary)
    return study


def finish(client, study: optuna.Study, parent_run_id: str, space: SearchSpace, metric: str, n_trials: int,
           registered_model: str | None, summary: Callable[[str], None]) -> Crowning | None:
    """What every worker does on its way out: fix dead workers' children, log the study on the parent,
    crown the champion, print the summary; the parent is FINISHED once the whole study is."""
    import mlflow

    parent = client.get_run(parent_run_id).info
    reconcile_children(client, study, {"run_id": parent_run_id, "experiment_id": parent.experiment_id})
    log_study(client, study, parent_run_id, space, metric)
    outcome = crown_best(client, study, registered_model, metric) if registered_model else None
    if outcome is not None:
        client.set_tag(parent_run_id, "champion_model", outcome.model)
        client.set_tag(parent_run_id, "champion_version", outcome.version)
        client.set_tag(parent_run_id, "champion_crowned", str(outcome.crowned).lower())
        client.set_tag(parent_run_id, "best_registered_version", outcome.candidate)
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
    uri, page = mlflow.get_tracking_uri(), f"#/experiments/{parent.experiment_id}/runs/{parent_run_id}"
    look = f"{uri}/{page}" if uri.startswith("http") else f"mlflow ui --backend-store-uri {uri}   (then open {page})"
    summary(f"parent run:  {parent_run_id}\nlook at it:  {look}")
    return outcome
