"""What a study leaves behind: dead workers' child runs closed, the summary, trials table, search space and
Optuna's plots on the parent run, a line per finished trial, and the champion alias moved to the best
registered trial when it beats the current one."""

from __future__ import annotations

import time
import warnings
from typing import Callable

import mlflow
import optuna
from optuna.trial import FrozenTrial, TrialState

from aetrack.tracking import tags
from aetrack.tracking.registry import CHAMPION, Crowning, crown  # noqa: F401 (CHAMPION, Crowning: re-exported)
from aetrack.tuning.space import SearchSpace

STATE_WORDS = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
               TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}
FAILURES_IN_A_ROW = 3  # a worker whose trials keep failing stops, rather than spend the budget on failures


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no complete trial yet
        return None


def reconcile_children(client, study: optuna.Study, parent: dict) -> int:
    """Child runs left RUNNING by a dead worker get their trial's final state; returns how many."""
    runs = client.search_runs([parent["experiment_id"]],
                              f"tags.`{tags.PARENT_RUN_ID}` = '{parent['run_id']}' and attributes.status = 'RUNNING'")
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    fixed = 0
    for run in runs:
        trial = trials.get(int(run.data.tags.get(tags.OPTUNA_TRIAL, -1)))
        if trial is not None and trial.state.is_finished():
            set_tags(client, run.info.run_id, {tags.OPTUNA_STATE: STATE_WORDS[trial.state]})
            client.set_terminated(run.info.run_id, "FINISHED" if trial.state == TrialState.COMPLETE else "FAILED")
            fixed += 1
    return fixed


def set_tags(client, run_id: str, values: dict[str, str], metrics: dict[str, float] | None = None) -> None:
    """Tags (and metrics) on a run that other workers may write at the same moment: the study's parent, a dead
    worker's child. MLflow's batch call retries an insert that loses such a race; its single `set_tag` fails with
    a duplicate key on a PostgreSQL-backed server when two workers finish together."""
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, value, now, 0) for key, value in (metrics or {}).items()],
                     tags=[RunTag(key, str(value)) for key, value in values.items()])


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
    marks = {tags.OPTUNA_TRIALS: str(len(trials))}
    if best is not None:
        metrics["best_value"] = best.value
        marks.update({tags.BEST_TRIAL: str(best.number), **{tags.BEST_PARAM.format(k): str(v) for k, v in best.params.items()}})
    set_tags(client, parent_run_id, marks, metrics)
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


def crown_best(client, study: optuna.Study, model: str, metric: str) -> Crowning | None:
    """Crown the study's best registered trial (`registry.crown`: only when it beats every version of the model).
    Workers that finish together may crown from different views of the study; each re-reads the study after
    moving the alias, and the best one (it only improves) ends up there."""
    minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
    outcome = None
    for _ in range(3):
        best = best_trial(study)
        if best is None or "registered_version" not in best.user_attrs:
            return outcome
        outcome = crown(client, model, metric, candidate=best.user_attrs["registered_version"], minimize=minimize)
        if best_trial(study).number == best.number:
            return outcome
    return outcome


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
