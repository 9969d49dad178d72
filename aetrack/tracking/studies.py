"""The lesson's questions as studies: each trains a grid of runs over several seeds, evaluates every run and
writes one `compare` report, so that one command answers one question from converged models.

A study is resumable: a run of the grid that already finished and was evaluated in the study's experiment
(tags `aetrack.study`, `aetrack.setting`, `seed`) is reused, not trained again.
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass, field, replace
from typing import Callable

from aetrack.config import TrainConfig
from aetrack.tracking import describe
from aetrack.tracking import metric_names as names
from aetrack.tracking import tags


@dataclass(frozen=True)
class Study:
    name: str
    question: str
    grid: tuple[dict[str, object], ...]      # the settings of each run (TrainConfig fields), seeds apart
    by: str                                  # the compare report's x axis
    metrics: tuple[str, ...]                 # the test metrics that answer the question (without test_)
    reference: bool = True                   # needs the reference classifier (generation metrics)
    baseline: dict[str, object] | None = None  # dae: evaluate with the run of these settings (same seed) as baseline

    def describe(self) -> str:
        settings = "\n".join(f"    {setting_key(s)}" for s in self.grid)
        return f"{self.name}: {self.question}\n  trains {len(self.grid)} settings:\n{settings}"


def grid(**axes) -> tuple[dict[str, object], ...]:
    """Every combination of the axes' values, in order: grid(model=("ae", "vae"), latent_dim=(2, 8))."""
    names = list(axes)
    return tuple(dict(zip(names, values)) for values in itertools.product(*axes.values()))


STUDIES = {study.name: study for study in (
    # Each architecture at its own usual width: an MLP of 256-128 units, a conv net of 32-64 channels.
    Study("latent-size", "How do latent size and architecture change reconstructions?",
          tuple({**s, **a} for s in grid(model=("ae", "vae"), latent_dim=(2, 8, 32))
                for a in ({"arch": "mlp", "hidden": (256, 128)}, {"arch": "conv", "hidden": (32, 64)})),
          by="latent_dim",
          metrics=("recon_loss", "psnr", "probe_accuracy"), reference=False),
    Study("denoising", "How well does a denoising autoencoder clean images, against a plain one?",
          ({"model": "ae"}, {"model": "dae", "noise": "gaussian", "noise_level": 0.3}), by="model",
          metrics=("psnr_noisy_at_0.3", "psnr_denoised_at_0.3", "psnr_baseline_at_0.3",
                   "psnr_noisy_at_0.5", "psnr_denoised_at_0.5", "psnr_baseline_at_0.5"),
          reference=False, baseline={"model": "ae"}),
    Study("generation", "Does a VAE generate better images than a plain autoencoder with a latent mixture?",
          ({"model": "ae"}, {"model": "vae"}), by="model", metrics=("fcd", "kid", "recon_loss")),
    Study("priors", "How does the prior shape samples and the latent space?",
          grid(model=("vae",), prior=("normal", "mog", "uniform", "vamp")), by="prior",
          metrics=("nll_iw", "neg_elbo", "kl", "active_units", "probe_accuracy", "fcd")),
    Study("conditional", "How do a conditional VAE and M2 compare with a plain VAE?",
          ({"model": "vae"}, {"model": "cvae"}, {"model": "m2"}), by="model",
          metrics=("label_accuracy", "cas", "error", "probe_accuracy", "fcd")),
    Study("regularised", "What do sparse and contractive autoencoders do differently?",
          ({"model": "ae"}, {"model": "sae"}, {"model": "cae"}), by="model",
          metrics=("fraction_near_zero", "mean_activation", "jacobian_frobenius_sq", "recon_loss", "probe_accuracy"),
          reference=False),
)}


def setting_key(setting: dict[str, object]) -> str:
    return ";".join(f"{k}={show(v)}" for k, v in setting.items())


def show(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


@dataclass
class Cell:
    """One setting of a study over its seeds: the runs and their test metrics."""
    setting: dict[str, object]
    run_ids: list[str] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)  # one per seed, without the test_ prefix

    def summary(self, metric: str) -> tuple[float, float, int] | None:
        """Mean, sample standard deviation (0 for one seed) and count of `metric` over the seeds."""
        values = [m[metric] for m in self.metrics if metric in m and math.isfinite(m[metric])]
        if not values:
            return None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


@dataclass
class StudyResult:
    study: Study
    dataset: str
    experiment: str
    cells: list[Cell]
    report_run_id: str | None = None

    def table(self) -> tuple[list[str], list[list[str]]]:
        keys = list(dict.fromkeys(k for cell in self.cells for k in cell.setting))
        header = [*keys, *(names.test(m) for m in self.study.metrics), "seeds"]
        rows = []
        for cell in self.cells:
            row = [show(cell.setting.get(k, "")) for k in keys]
            for metric in self.study.metrics:
                found = cell.summary(metric)
                row.append("" if found is None else format_spread(found[0], found[1], found[2]))
            rows.append([*row, str(len(cell.run_ids))])
        return header, rows

    def markdown(self) -> str:
        header, rows = self.table()
        lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])

    def text(self) -> str:
        header, rows = self.table()
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *rows])

    def as_dict(self) -> dict:
        return {"study": self.study.name, "question": self.study.question, "dataset": self.dataset,
                "experiment": self.experiment, "report_run_id": self.report_run_id,
                "cells": [{"setting": c.setting, "run_ids": c.run_ids, "metrics": c.metrics,
                           "summary": {m: c.summary(m) for m in self.study.metrics}} for c in self.cells]}


def format_spread(mean: float, spread: float, count: int) -> str:
    digits = 3 if abs(mean) < 10 else 2 if abs(mean) < 100 else 1
    return f"{mean:.{digits}f}" + (f" ± {spread:.{digits}f}" if count > 1 else "")


def run_study(study: Study, *, dataset: str = "digits", seeds: int = 3, experiment: str | None = None,
              base: TrainConfig = TrainConfig(), data_dir: str | None = None,
              device: str = "cpu", echo: Callable[[str], None] = print, report_dir=None) -> StudyResult:
    """Train (or reuse), evaluate and compare every run of `study`; returns the table's numbers."""
    import mlflow

    from aetrack import data as datasets
    from aetrack.evaluation import Settings
    from aetrack.tracking import compare
    from aetrack.tracking.evaluate import evaluate_run
    from aetrack.tracking.run import TrackingOptions, train_tracked

    experiment = experiment or f"study-{study.name}-{dataset}"
    client = mlflow.MlflowClient()
    experiment_id = describe.open_experiment(client, experiment, f"`aetrack study {study.name}`: {study.question}")
    cells = [Cell(setting) for setting in study.grid]
    loaded: dict[int, object] = {}
    baseline_runs: dict[int, str] = {}
    # The baseline's setting is trained first, so that every dae evaluation finds its seed's baseline run.
    order = sorted(range(len(cells)), key=lambda i: cells[i].setting != study.baseline)
    for seed, index in itertools.product(range(seeds), order):
        cell = cells[index]
        config = replace(base, dataset=dataset, seed=seed, **cell.setting)
        key = setting_key(cell.setting)
        run_id = finished_run(client, experiment_id, study.name, key, seed)
        if run_id is None:
            if seed not in loaded:
                loaded.clear()  # one seed's split at a time
                loaded[seed] = datasets.load(dataset, data_dir=data_dir, binarize=config.binarize,
                                             val_fraction=config.val_fraction, seed=seed, device=device)
            echo(f"[{study.name}] training {key} seed {seed}")
            marks = {tags.STUDY: study.name, tags.SETTING: key}
            options = TrackingOptions(experiment, f"{study.name} {key} seed {seed}", register=False)
            run_id = train_tracked(config, loaded[seed], options, data_dir=data_dir, progress=False, tags=marks).run_id
        metrics = client.get_run(run_id).data.metrics
        if names.test("recon_loss") not in metrics:
            echo(f"[{study.name}] evaluating {key} seed {seed} ({run_id})")
            baseline = baseline_runs.get(seed) if study.baseline and cell.setting != study.baseline else None
            evaluate_run(run_id, Settings(seed=seed), use_reference=study.reference, baseline=baseline,
                         data_dir=data_dir, device=device, echo=echo)
            client.set_tag(run_id, tags.EVALUATED, "true")
            metrics = client.get_run(run_id).data.metrics
        if study.baseline and cell.setting == study.baseline:
            baseline_runs[seed] = run_id
        cell.run_ids.append(run_id)
        cell.metrics.append({names.short(k): v for k, v in metrics.items() if names.is_test(k)})
    result = StudyResult(study, dataset, experiment, cells)
    runs = [client.get_run(run_id) for cell in cells for run_id in cell.run_ids]
    present = {m for cell in cells for row in cell.metrics for m in row}
    report = compare.build_report(runs, by=study.by, metrics=tuple(m for m in study.metrics if m in present), client=client)
    title = f"aetrack study {study.name} on {dataset}: {study.question}"
    result.report_run_id, _ = compare.publish(client, experiment_id, report, title, output=report_dir,
                                              run_name=f"{study.name} report")
    return result


def finished_run(client, experiment_id: str, study: str, key: str, seed: int) -> str | None:
    """The id of this setting's finished run for `seed` in the study's experiment, if one exists."""
    runs = client.search_runs([experiment_id], f"tags.`{tags.STUDY}` = '{study}' and attributes.status = 'FINISHED'",
                              max_results=1000)
    # A run logs only the settings it changed: seed 0, the default, is no param.
    matching = [r for r in runs if r.data.tags.get(tags.SETTING) == key and TrainConfig.from_params(r.data.params).seed == seed]
    return matching[0].info.run_id if matching else None
