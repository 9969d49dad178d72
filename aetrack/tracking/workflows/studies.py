"""The lesson's questions as studies: each trains a grid of runs over several seeds, evaluates every run and
writes one `compare` report, so that one command answers one question from converged models.

This module holds the grids and the result; aetrack.tracking.workflows.study_runner trains them, in one process or in many
workers on many hosts (aetrack.tracking.workflows.study_claims). A study is resumable: a run of the grid that already finished
and was evaluated in the study's experiment (tags `aetrack.study`, `aetrack.setting`, `seed`) is reused.
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass, field, replace

from aetrack.tracking import metric_names as names

RUN_OF = "@"  # a setting's value "@KEY": the run id of the grid's setting KEY for the same seed (M1+M2's features)
NOISE_KINDS = ("gaussian", "masking", "salt-pepper")
NOISE_LEVELS = (0.1, 0.3, 0.5)


@dataclass(frozen=True)
class Study:
    name: str
    question: str
    grid: tuple[dict[str, object], ...]      # the settings of each run (TrainConfig fields), seeds apart
    by: str                                  # the compare report's x axis
    metrics: tuple[str, ...]                 # the test metrics that answer the question (without test_)
    reference: bool = True                   # needs the reference classifier (generation metrics)
    baseline: dict[str, object] | None = None  # dae: evaluate with the run of these settings (same seed) as baseline
    evaluation: dict[str, object] = field(default_factory=dict)  # aetrack.evaluation.Settings other than the defaults
    better: dict[str, str] = field(default_factory=dict)  # metric -> "higher" or "lower": the strengths table's
    derived: tuple[str, ...] = ()  # settings that follow from the others (an MLP's widths from its latent size): no axis

    def describe(self, seeds: int = 3, measured: str = "") -> str:
        settings = "\n".join(f"    {setting_key(s)}" for s in self.grid)
        runs = f"{len(self.grid)} settings x {seeds} seeds = {len(self.grid) * seeds} runs"
        return f"{self.name}: {self.question}\n  trains {runs}{measured}:\n{settings}"

    def baseline_of(self, setting: dict[str, object]) -> dict[str, object] | None:
        """The grid's baseline setting for `setting` (a dae's): the baseline model with the same other settings
        (architecture, widths), or None where the study has no baseline or `setting` is one."""
        if not self.baseline or all(setting.get(k) == v for k, v in self.baseline.items()):
            return None
        for candidate in self.grid:
            if all(candidate.get(k) == v for k, v in self.baseline.items()) and all(
                    setting.get(k) == v for k, v in candidate.items() if k not in self.baseline):
                return candidate
        return None

    def needs(self, setting: dict[str, object]) -> list[dict[str, object]]:
        """The grid's settings whose run (same seed) this one needs first: its baseline, the run its `@` values name."""
        by_key = {setting_key(s): s for s in self.grid}
        needed = [by_key[str(v)[1:]] for v in setting.values() if isinstance(v, str) and v.startswith(RUN_OF)]
        baseline = self.baseline_of(setting)
        return needed + ([baseline] if baseline else [])

    def restricted(self, only: dict[str, str]) -> Study:
        """This study on the settings that have every value of `only` (as `show` writes it, or the same number),
        with the settings they need; `only` empty: the whole grid."""
        chosen = [s for s in self.grid if all(k in s and same(s[k], value) for k, value in only.items())]
        keys = {setting_key(s) for s in chosen}
        keys |= {setting_key(need) for s in chosen for need in self.needs(s)}
        return replace(self, grid=tuple(s for s in self.grid if setting_key(s) in keys))

    def order(self) -> list[int]:
        """The grid's indices with every setting after those it needs."""
        done: list[int] = []
        keys = [setting_key(s) for s in self.grid]

        def visit(index: int) -> None:
            if index not in done:
                for need in self.needs(self.grid[index]):
                    visit(keys.index(setting_key(need)))
                done.append(index)
        for index in range(len(self.grid)):
            visit(index)
        return done


def grid(**axes) -> tuple[dict[str, object], ...]:
    """Every combination of the axes' values, in order: grid(model=("ae", "vae"), latent_dim=(2, 8))."""
    keys = list(axes)
    return tuple(dict(zip(keys, values)) for values in itertools.product(*axes.values()))


# latent-size: a conv net of 32-64 channels and an MLP whose widths give it about as many parameters on digits (8x8),
# within 5 % at each latent size (ae: 38.9k vs 40.0k, 42.0k vs 44.3k, 54.3k vs 55.7k); each run logs test/parameters.
MATCHED_MLP = {2: (144, 72), 8: (152, 76), 32: (168, 84)}
CONV = {"arch": "conv", "hidden": (32, 64)}
ARCHITECTURES = ({"arch": "mlp", "hidden": (256, 128)}, CONV)
GENERATION = ("fcd", "kid", "sample_confidence", "nearest_train_distance", "memorisation_ratio")

STUDIES = {study.name: study for study in (
    Study("latent-size", "How do latent size and architecture change reconstructions?",
          tuple({"model": model, "latent_dim": latent, **a} for model, latent in itertools.product(("ae", "vae"), (2, 8, 32))
                for a in ({"arch": "mlp", "hidden": MATCHED_MLP[latent]}, CONV)),
          by="latent_dim", metrics=("recon_loss", "psnr", "probe_accuracy", "parameters"), reference=False,
          derived=("hidden",)),
    Study("denoising", "How well does a denoising autoencoder clean images of each kind of noise, against a plain one?",
          tuple({"model": "ae", **a} for a in ARCHITECTURES)
          + tuple({"model": "dae", "noise": kind, "noise_level": level, **a}
                  for kind, level, a in itertools.product(NOISE_KINDS, NOISE_LEVELS, ARCHITECTURES)),
          by="model", metrics=tuple(f"psnr_{what}_{kind}_at_0.3" for kind in NOISE_KINDS for what in ("denoised", "baseline")),
          reference=False, baseline={"model": "ae"}),
    Study("generation", "Does a VAE generate better images than a plain autoencoder with a latent mixture?",
          ({"model": "ae"}, {"model": "vae", "prior": "normal"}, {"model": "vae", "prior": "mog"}), by="model",
          metrics=(*GENERATION, "recon_loss")),
    Study("priors", "How does the prior shape samples and the latent space?",
          grid(model=("vae",), prior=("normal", "mog", "uniform", "vamp"), latent_dim=(2, 8)), by="prior",
          metrics=("fcd", "kid", "sample_confidence", "active_units", "aggregate_kl", "probe_accuracy", "knn_accuracy",
                   "nll_iw")),
    # M1+M2: M2 on the codes of the same seed's vae run (`--features RUN`). The supervised-only classifier (M2's
    # q(y|x) on the same 100 labels) is measured with each semi-supervised run: supervised_error.
    Study("conditional", "How do a conditional VAE, M2 and M1+M2 compare with a plain VAE?",
          ({"model": "vae"}, {"model": "cvae"}, {"model": "m2"}, {"model": "m1m2", "features": RUN_OF + "model=vae"}),
          by="model", metrics=("label_accuracy", "error", "supervised_error", "cas", "fcd", "kid", "sample_confidence"),
          evaluation={"supervised_baseline": True}, derived=("features",)),
    Study("regularised", "What do sparse, contractive and denoising autoencoders do differently?",
          ({"model": "ae"}, {"model": "dae"},
           *({"model": "sae", "sparsity": "l1", "sparsity_weight": w} for w in (1e-4, 1e-3, 1e-2)),
           *({"model": "sae", "sparsity": "kl", "sparsity_weight": w} for w in (0.01, 0.1, 1.0)),
           *({"model": "cae", "contractive_weight": w} for w in (1e-3, 1e-2, 1e-1)),
           {"model": "vae"}),
          by="model",
          metrics=("fraction_near_zero", "lifetime_sparsity", "jacobian_frobenius_sq", "perturbed_mse", "probe_accuracy",
                   "recon_loss"),
          reference=False,
          better={"fraction_near_zero": "higher", "lifetime_sparsity": "higher", "jacobian_frobenius_sq": "lower",
                  "perturbed_mse": "lower", "probe_accuracy": "higher", "recon_loss": "lower"}),
)}


def setting_key(setting: dict[str, object]) -> str:
    return ";".join(f"{k}={show(v)}" for k, v in setting.items())


def same(value: object, written: str) -> bool:
    if show(value) == written:
        return True
    try:
        return isinstance(value, (int, float)) and float(written) == float(value)
    except ValueError:
        return False


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

    def strengths(self) -> list[dict[str, object]]:
        """Per setting, the metrics of `study.better` where its mean ranks in the best third of the settings that have
        the metric (strengths) and in the worst third (weaknesses)."""
        table = [{"setting": setting_key(c.setting), "strengths": [], "weaknesses": []} for c in self.cells]
        for metric, direction in self.study.better.items():
            means = [(found[0], i) for i, c in enumerate(self.cells) if (found := c.summary(metric))]
            if len(means) < 3:
                continue
            ranked = [i for _, i in sorted(means, reverse=direction == "higher")]
            third = len(ranked) // 3
            for i in ranked[:third]:
                table[i]["strengths"].append(metric)
            for i in ranked[-third:]:
                table[i]["weaknesses"].append(metric)
        return table

    def strengths_text(self) -> str:
        rows = self.strengths()
        width = max(len(r["setting"]) for r in rows)
        return "\n".join(f"{r['setting']:{width}}  + {', '.join(r['strengths']) or '-'}   - {', '.join(r['weaknesses']) or '-'}"
                         for r in rows)

    def as_dict(self) -> dict:
        record = {"study": self.study.name, "question": self.study.question, "dataset": self.dataset,
                  "experiment": self.experiment, "report_run_id": self.report_run_id,
                  "cells": [{"setting": c.setting, "run_ids": c.run_ids, "metrics": c.metrics,
                             "summary": {m: c.summary(m) for m in self.study.metrics}} for c in self.cells]}
        if self.study.better:
            record["strengths"] = self.strengths()
        if self.study.derived:
            record["derived"] = list(self.study.derived)
        return record


def format_spread(mean: float, spread: float, count: int) -> str:
    if spread == 0 and float(mean).is_integer():  # a count (parameters) that the seeds do not change
        return f"{int(mean)}"
    digits = 3 if abs(mean) < 10 else 2 if abs(mean) < 100 else 1
    return f"{mean:.{digits}f}" + (f" ± {spread:.{digits}f}" if count > 1 else "")
