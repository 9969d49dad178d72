"""Running a study (aetrack.tracking.workflows.studies): its tasks, one setting and one seed each, trained and evaluated by one
or more workers, then collected into one table and one `compare` report.

Workers share the grid through leases (aetrack.tracking.workflows.study_claims): `--workers N` starts N processes on this
machine (one torch thread each); workers on other hosts join with the same `--storage` and MLflow server. The
study's MLflow experiment is the record of what is done: a task is done when its run finished and was evaluated.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from aetrack.config import TrainConfig, UserError
from aetrack.tracking import describe
from aetrack.tracking import metric_names as names
from aetrack.tracking import tags
from aetrack.tracking.workflows.studies import RUN_OF, Cell, Study, StudyResult, setting_key
from aetrack.tracking.workflows.study_claims import Claims, NoClaims

POLL_SECONDS = 2.0  # how often a worker with nothing to take looks again for tasks that others hold


@dataclass(frozen=True)
class Plan:
    """What every worker of one study needs to know, picklable for a worker process."""
    study: Study
    dataset: str
    seeds: int
    experiment: str
    base: TrainConfig
    data_dir: str | None
    device: str
    storage: str | None
    lease: float
    tracking_uri: str

    def task(self, setting: dict, seed: int) -> str:
        return f"{setting_key(setting)};seed={seed}"


def run_study(study: Study, *, dataset: str = "digits", seeds: int = 3, experiment: str | None = None,
              base: TrainConfig = TrainConfig(), data_dir: str | None = None, device: str = "cpu",
              echo: Callable[[str], None] = print, report_dir=None, workers: int = 1, storage: str | None = None,
              lease: float = 120.0) -> StudyResult:
    """Train (or reuse), evaluate and compare every run of `study`; returns the table's numbers.

    With `workers` > 1, that many processes share the grid through leases in `storage` (an SQLAlchemy URL; a
    temporary SQLite file when none is given); with `storage` and one worker, this process is one worker among
    those of other hosts. Returns once every task of the grid is done, by whichever worker."""
    import mlflow

    experiment = experiment or f"study-{study.name}-{dataset}"
    client = mlflow.MlflowClient()
    describe.open_experiment(client, experiment, f"`aetrack study {study.name}`: {study.question}")
    if study.reference:  # trained and registered once, before workers race to
        from aetrack.tracking.reference import reference_classifier

        reference_classifier(dataset, data_dir=data_dir, device=device, log=echo)
    plan = Plan(study, dataset, seeds, experiment, base, data_dir, device, storage, lease, mlflow.get_tracking_uri())
    if workers == 1:
        claims = Claims(storage, experiment, lease) if storage else NoClaims()
        try:
            run_tasks(plan, claims, echo)
        finally:
            claims.close()
    else:
        with tempfile.TemporaryDirectory(prefix="aetrack-study-") as folder:
            shared = replace(plan, storage=storage or f"sqlite:///{Path(folder) / 'claims.db'}")
            run_workers(shared, workers, echo)
    return collect_and_report(study, plan, client, report_dir)


def run_workers(plan: Plan, workers: int, echo: Callable[[str], None]) -> None:
    """`workers` processes on this machine, one torch thread each, until the grid is done."""
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads and sockets
    processes = [context.Process(target=worker_main, args=(plan, number), name=f"study worker {number}")
                 for number in range(1, workers + 1)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    failed = [p.name for p in processes if p.exitcode]
    if failed:
        raise UserError(f"{', '.join(failed)} stopped with an error (its output is above); "
                        f"run the study again to resume")


def worker_main(plan: Plan, number: int) -> None:
    """A worker process: one torch thread, the parent's tracking URI, its lines prefixed with its number."""
    import sys

    import mlflow
    import torch

    torch.set_num_threads(1)
    mlflow.set_tracking_uri(plan.tracking_uri)
    claims = Claims(plan.storage, plan.experiment, plan.lease)
    try:
        run_tasks(plan, claims, lambda line: print(f"[worker {number}] {line}", file=sys.stderr, flush=True))
    finally:
        claims.close()


def run_tasks(plan: Plan, claims, echo: Callable[[str], None]) -> None:
    """Take, train and evaluate the study's tasks until every one is done (by this worker or another)."""
    import mlflow

    study = plan.study
    client = mlflow.MlflowClient()
    experiment_id = client.get_experiment_by_name(plan.experiment).experiment_id
    order = study.order()
    pending = [(seed, index) for seed in range(plan.seeds) for index in order]
    loaded: dict[int, object] = {}
    while pending:
        progressed = False
        runs = study_runs(client, experiment_id, study.name)
        for seed, index in list(pending):
            setting = study.grid[index]
            if evaluated(runs.get((setting_key(setting), seed))):
                pending.remove((seed, index))
                continue
            if any(not evaluated(runs.get((setting_key(need), seed))) for need in study.needs(setting)):
                continue  # what it needs is another worker's, still running: come back to it
            task = plan.task(setting, seed)
            if not claims.claim(task):
                continue
            with claims.holding(task):
                # Looked up again under the lease: a worker may have finished it since `runs` was read.
                runs = study_runs(client, experiment_id, study.name)
                run_task(plan, study, setting, seed, runs, loaded, client, echo)
            pending.remove((seed, index))
            progressed = True
            break  # read the runs again: others may have finished tasks meanwhile
        if pending and not progressed:
            time.sleep(POLL_SECONDS)


def run_task(plan: Plan, study: Study, setting: dict, seed: int, runs: dict, loaded: dict, client, echo) -> None:
    """Train the task's run unless it finished, then evaluate it unless it was."""
    from aetrack import data as datasets
    from aetrack.evaluation import Settings
    from aetrack.tracking.workflows.evaluate import evaluate_run
    from aetrack.tracking.run import TrackingOptions, train_tracked

    key = setting_key(setting)
    resolved = {k: runs[(str(v)[1:], seed)].info.run_id if isinstance(v, str) and v.startswith(RUN_OF) else v
                for k, v in setting.items()}
    run = runs.get((key, seed))
    if run is None:
        config = replace(plan.base, dataset=plan.dataset, seed=seed, **resolved)
        if seed not in loaded:
            loaded.clear()  # one seed's split at a time
            loaded[seed] = datasets.load(plan.dataset, data_dir=plan.data_dir, binarize=config.binarize,
                                         val_fraction=config.val_fraction, seed=seed, device=plan.device)
        echo(f"[{study.name}] training {key} seed {seed}")
        marks = {tags.STUDY: study.name, tags.SETTING: key}
        options = TrackingOptions(plan.experiment, f"{study.name} {key} seed {seed}", register=False)
        run_id = train_tracked(config, loaded[seed], options, data_dir=plan.data_dir, progress=False, tags=marks).run_id
    else:
        run_id = run.info.run_id
    if names.test("recon_loss") not in client.get_run(run_id).data.metrics:
        echo(f"[{study.name}] evaluating {key} seed {seed} ({run_id})")
        baseline = study.baseline_of(setting)
        baseline_id = runs[(setting_key(baseline), seed)].info.run_id if baseline else None
        evaluate_run(run_id, Settings(seed=seed, **study.evaluation), use_reference=study.reference, baseline=baseline_id,
                     data_dir=plan.data_dir, device=plan.device, echo=echo)
        client.set_tag(run_id, tags.EVALUATED, "true")


def study_runs(client, experiment_id: str, study: str) -> dict[tuple[str, int], object]:
    """The study's finished runs by (setting key, seed); of two for one task (none when workers share leases), the
    evaluated one."""
    runs = client.search_runs([experiment_id], f"tags.`{tags.STUDY}` = '{study}' and attributes.status = 'FINISHED'",
                              max_results=10_000)
    found: dict[tuple[str, int], object] = {}
    # A run logs only the settings it changed: seed 0, the default, is no param.
    for run in sorted(runs, key=lambda r: (evaluated(r), -r.info.start_time)):
        found[(run.data.tags.get(tags.SETTING), TrainConfig.from_params(run.data.params).seed)] = run
    return found


def evaluated(run) -> bool:
    return run is not None and names.test("recon_loss") in run.data.metrics


def finished_run(client, experiment_id: str, study: str, key: str, seed: int) -> str | None:
    """The id of this setting's finished run for `seed` in the study's experiment, if one exists."""
    run = study_runs(client, experiment_id, study).get((key, seed))
    return None if run is None else run.info.run_id


def collect_and_report(study: Study, plan: Plan, client, report_dir) -> StudyResult:
    from aetrack.tracking.reports import compare

    experiment_id = client.get_experiment_by_name(plan.experiment).experiment_id
    runs = study_runs(client, experiment_id, study.name)
    cells = [Cell(setting) for setting in study.grid]
    for cell in cells:
        for seed in range(plan.seeds):
            run = runs.get((setting_key(cell.setting), seed))
            if not evaluated(run):
                raise UserError(f"study {study.name}: {setting_key(cell.setting)} seed {seed} has no evaluated run; "
                                f"run the study again to resume")
            cell.run_ids.append(run.info.run_id)
            cell.metrics.append({names.short(k): v for k, v in run.data.metrics.items() if names.is_test(k)})
    result = StudyResult(study, plan.dataset, plan.experiment, cells)
    chosen = [client.get_run(run_id) for cell in cells for run_id in cell.run_ids]
    present = {m for cell in cells for row in cell.metrics for m in row}
    report = compare.build_report(chosen, by=study.by, metrics=tuple(m for m in study.metrics if m in present), client=client)
    title = f"aetrack study {study.name} on {plan.dataset}: {study.question}"
    result.report_run_id, _ = compare.publish(client, experiment_id, report, title, output=report_dir,
                                              run_name=f"{study.name} report")
    return result


def last_measured(name: str, root: Path | None = None) -> dict[str, tuple[float, int, int, str]]:
    """(seconds, seeds, settings, date) of the last recorded run of study `name`, by data set, from benchmarks/results/questions/ where this
    checkout has it (`python benchmarks/questions.py` writes it)."""
    import json

    folder = (root or Path(__file__).resolve().parents[3]) / "benchmarks" / "results" / "questions"
    found = {}
    for path in sorted(folder.glob(f"{name}@*.json")) if folder.exists() else ():
        record = json.loads(path.read_text())
        if record.get("seconds") is not None:
            cells = record.get("cells") or [{"run_ids": []}]
            found[record["dataset"]] = (record["seconds"], len(cells[0]["run_ids"]), len(cells),
                                        record.get("machine", {}).get("date", ""))
    return found

