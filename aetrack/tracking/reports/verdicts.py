"""A study's verdicts, computed from its record (`StudyResult.as_dict()`), never typed.

The rule, stated once (`RULE`) and applied to every record alike, whatever its grid:

- Which pairs. Two settings are compared when they differ in one axis only, every other setting equal. Keys that
  always change together (an architecture and its layer sizes, a dae and its noise) are one axis. A numeric axis
  (latent size) compares neighbouring values only; any other axis compares every pair of its values. Metrics named
  `M_ROLE_at_LEVEL` (the denoising PSNRs) also compare the roles within each setting: the noisy input, the model's
  output, the baseline's output, at each level.
- Which metrics: every metric of the study (the record's `summary`), each with its direction from
  `metric_names.better`: "X beats Y" where the metric has a better side, "X is higher than Y" where it has none.
- The test: Welch's t-test (unequal variances), two-sided, at 0.05, over the seeds, when each side has at least 3
  (fewer: "not tested"). Holm's correction over all of a record's tests is reported beside it, not used for the
  sentence: with three seeds a side it would hide most real differences, so the page says how many tests were made.
"""

from __future__ import annotations

import itertools
import math
import re
import statistics
from dataclasses import dataclass, replace

from aetrack.tracking import metric_names as names

ALPHA = 0.05
MIN_SEEDS = 3
ROLE = re.compile(r"^(?P<measure>[a-z]+)_(?P<role>[a-z]+)(?:_(?P<kind>[a-z-]+))?_at_(?P<level>[\d.]+)$")
ROLE_NAMES = {"noisy": "the noisy input"}  # the other roles are outputs: named by their model
# The noisy input and the baseline's output are the same for every setting that shares the baseline: compared with a
# setting's own output, not across settings.
SHARED_ROLES = ("noisy", "baseline")


def rule() -> str:
    lower, higher = ", ".join(names.LOWER), ", ".join(names.HIGHER)
    return (f"Two settings are compared when they differ in one axis only (keys that always change together count as "
            f"one); a numeric axis only between neighbouring values. Each metric of the table is tested with Welch's "
            f"t-test (two-sided, unequal variances) over the seeds, at {ALPHA:g}, when each side has at least "
            f"{MIN_SEEDS} seeds. \"Beats\" follows the metric's direction (lower is better for names with {lower}; "
            f"higher for {higher}); a metric with neither, such as a KL or a sparsity, reads \"is higher than\". "
            f"What describes a setting rather than its outcome ({', '.join(names.DESCRIBES)}) is shown, not tested. "
            "Metrics named `M_ROLE_at_LEVEL` (the denoising PSNRs) also compare a setting's outputs with each other at "
            "each level. d is the difference of the means. Holm's correction over all of a record's tests is shown "
            "beside each p (a † on a verdict that holds after it), not used for the sentence: with three seeds a "
            "side it would hide most real differences.")


@dataclass(frozen=True)
class Comparison:
    axis: str               # what differs: a setting's key, or the metric's roles
    context: str            # what the two sides share ("ae, latent_dim 2"), "" when nothing
    metric: str             # as the sentence names it
    first: str              # the two sides' labels, in the grid's order
    second: str
    first_values: tuple[float, ...]
    second_values: tuple[float, ...]
    direction: str | None   # "higher", "lower" or None (metric_names.better)
    p: float | None = None  # None: not tested (too few seeds)
    holm: float | None = None

    @property
    def seeds(self) -> tuple[int, int]:
        return len(self.first_values), len(self.second_values)

    @property
    def difference(self) -> float:
        """First side's mean minus the second's."""
        return statistics.fmean(self.first_values) - statistics.fmean(self.second_values)

    @property
    def shown(self) -> bool:
        return self.p is not None and self.p < ALPHA

    @property
    def holds_after_holm(self) -> bool:
        return self.holm is not None and self.holm < ALPHA


def welch_p(a, b) -> float:
    """Two-sided p of Welch's t-test. Two constant samples: 0 when they differ (their intervals cannot overlap),
    1 when equal, where the t statistic is undefined."""
    if statistics.pvariance(a) == 0 and statistics.pvariance(b) == 0:
        return 1.0 if statistics.fmean(a) == statistics.fmean(b) else 0.0
    import warnings

    from scipy.stats import ttest_ind

    with warnings.catch_warnings():  # nearly equal samples: scipy warns of precision, and the p is near 1 anyway
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(ttest_ind(a, b, equal_var=False).pvalue)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


# ----- which pairs --------------------------------------------------------------------------------------------------

def value_label(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def axes(settings: list[dict]) -> list[tuple[str, ...]]:
    """The grid's axes: its keys whose values vary, those that always change together as one (first key names it)."""
    keys = list(dict.fromkeys(k for s in settings for k in s))
    groups: dict[tuple, list[str]] = {}
    for key in keys:
        values = [value_label(s.get(key)) for s in settings]
        if len(set(values)) > 1:  # which settings share a value: the partition this key makes
            partition = tuple(tuple(i for i, v in enumerate(values) if v == value) for value in dict.fromkeys(values))
            groups.setdefault(partition, []).append(key)
    return [tuple(group) for group in groups.values()]


def numeric(values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def label(setting: dict, axis: tuple[str, ...]) -> str:
    """A setting's value on an axis: `conv`; a value absent (a plain ae has no noise) reads as the first key's."""
    return value_label(setting.get(axis[0], "none"))


def present(settings: list[dict], axis: tuple[str, ...]) -> list:
    """The axis's values in the settings that have it (a plain ae has no noise)."""
    return [s[axis[0]] for s in settings if axis[0] in s]


def side(settings: list[dict], i: int, axis: tuple[str, ...]) -> str:
    """A compared side's name in a sentence: `conv`, or `latent_dim 8` where the value is a bare number."""
    shown = label(settings[i], axis)
    return f"{axis[0]} {shown}" if numeric(present(settings, axis)) else shown


def describe(setting: dict, others: list[tuple[str, ...]]) -> str:
    """What two compared settings share: `ae, latent_dim 2` (the model by its name alone)."""
    return ", ".join(label(setting, axis) if axis[0] == "model" else f"{axis[0]} {label(setting, axis)}"
                     for axis in others if axis[0] in setting)


def differ(a: dict, b: dict, axis: tuple[str, ...]) -> bool:
    """Whether two settings differ on an axis. A setting without the axis's key is one the key does not apply to (a
    plain ae has no prior, an sae no contractive weight): no difference there."""
    return axis[0] in a and axis[0] in b and label(a, axis) != label(b, axis)


def pairs(settings: list[dict]) -> list[tuple[tuple[str, ...], int, int]]:
    """(axis, i, j): the settings i < j that differ in this axis only, keys that do not apply to one of them aside;
    a numeric axis: neighbouring values only."""
    found = []
    grid_axes = axes(settings)
    for axis in grid_axes:
        others = [a for a in grid_axes if a != axis]
        values = present(settings, axis)
        ordered = sorted(set(values), key=float) if numeric(values) else None
        for i, j in itertools.combinations(range(len(settings)), 2):
            if not differ(settings[i], settings[j], axis) or any(differ(settings[i], settings[j], a) for a in others):
                continue
            if ordered and abs(ordered.index(settings[i][axis[0]]) - ordered.index(settings[j][axis[0]])) != 1:
                continue
            found.append((axis, i, j))
    return found


# ----- the comparisons of one record --------------------------------------------------------------------------------

def values(cell: dict, metric: str) -> tuple[float, ...]:
    return tuple(m[metric] for m in cell["metrics"] if m.get(metric) is not None and math.isfinite(m[metric]))


def baseline_label(record: dict, settings: list[dict]) -> str:
    """The study's baseline setting (a dae's plain ae), by its value on the grid's first axis."""
    from aetrack.tracking.workflows.studies import STUDIES

    study = STUDIES.get(record.get("study"))
    base = study.baseline if study else None
    grid_axes = axes(settings)
    return label(base, grid_axes[0]) if base and grid_axes else "the baseline"


def compared_settings(record: dict) -> list[dict]:
    """The record's settings without those its study derives from the others (`derived`: the MLP's widths that
    match the conv net's parameter count at each latent size vary with the latent size, but are no axis of theirs)."""
    derived = set(record.get("derived", ()))
    return [{k: v for k, v in c["setting"].items() if k not in derived} for c in record["cells"]]


def comparisons(record: dict, min_seeds: int = MIN_SEEDS) -> list[Comparison]:
    """Every comparison the rule makes on a record, tested where the seeds allow, with Holm's p over the tested."""
    cells = record["cells"]
    settings = compared_settings(record)
    metrics = list(dict.fromkeys(m for c in cells for m in c["summary"] if names.short(m) not in names.DESCRIBES))
    grid_axes = axes(settings)
    found: list[Comparison] = []
    for axis, i, j in pairs(settings):
        context = describe({**settings[j], **settings[i]}, [a for a in grid_axes if a != axis])
        for metric in metrics:
            if (role := ROLE.match(metric)) and role["role"] in SHARED_ROLES:
                continue
            a, b = values(cells[i], metric), values(cells[j], metric)
            if a and b:
                found.append(Comparison(axis[0], context, metric, side(settings, i, axis), side(settings, j, axis),
                                        a, b, names.better(metric)))
    found += output_comparisons(record, metrics)
    tested = [c if min(c.seeds) < min_seeds else replace(c, p=welch_p(c.first_values, c.second_values))
              for c in found]
    adjusted = iter(holm([c.p for c in tested if c.p is not None]))
    return [replace(c, holm=next(adjusted)) if c.p is not None else c for c in tested]


def output_comparisons(record: dict, metrics: list[str]) -> list[Comparison]:
    """Within each setting, the outputs that metrics `M_ROLE_at_LEVEL` measure, each pair at each level."""
    roles: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for metric in metrics:
        match = ROLE.match(metric)
        if match:
            measure = f"{match['measure']}_{match['kind']}" if match["kind"] else match["measure"]
            roles.setdefault((measure, match["level"]), []).append((match["role"], metric))
    settings = [c["setting"] for c in record["cells"]]
    found = []
    for cell in record["cells"] if roles else []:
        own = describe(cell["setting"], axes(settings))
        output = str(cell["setting"].get("model", own))  # the setting's own output, by its model's name
        named = {**ROLE_NAMES, "baseline": baseline_label(record, settings)}
        for (measure, level), members in roles.items():
            for (role_a, metric_a), (role_b, metric_b) in itertools.combinations(members, 2):
                a, b = values(cell, metric_a), values(cell, metric_b)
                if a and b:
                    found.append(Comparison("output", f"the runs of {own}", f"{measure}_at_{level}",
                                            named.get(role_a, output), named.get(role_b, output), a, b,
                                            names.better(measure.split("_")[0])))
    return found


# ----- the sentences ------------------------------------------------------------------------------------------------

def figure(x: float) -> str:
    """Three significant figures, never an exponent: 0.425, 4.17, 766."""
    x = float(f"{x:.3g}")
    if x == 0:
        return "0"
    return f"{x:.{max(0, 2 - math.floor(math.log10(abs(x))))}f}"


def p_value(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.2g}"


def p_text(p: float) -> str:
    return "p " + p_value(p) if p < 0.001 else "p = " + p_value(p)


def seeds_text(c: Comparison) -> str:
    a, b = c.seeds
    n = f"{a}" if a == b else f"{min(a, b)} and {max(a, b)}"
    return f"{n} seed{'s' if max(a, b) != 1 else ''}"


def sentence(c: Comparison) -> str:
    """"X beats Y on M by d (p = …)", "X is higher than Y on M by d (p = …)" (no better side), "no difference shown
    on M with 3 seeds (p = …)" or "not tested on M: 1 seed"."""
    if c.p is None:
        return f"not tested on `{c.metric}`: {seeds_text(c)}"
    if not c.shown:
        return f"no difference shown on `{c.metric}` with {seeds_text(c)} ({p_text(c.p)})"
    high, low = (c.first, c.second) if c.difference > 0 else (c.second, c.first)
    if c.direction is None:
        verb, winner, loser = "is higher than", high, low
    else:
        winner, loser = (high, low) if c.direction == "higher" else (low, high)
        verb = "beats"
    return f"{winner} {verb} {loser} on `{c.metric}` by {figure(abs(c.difference))} ({p_text(c.p)})"


def clauses(found: list[Comparison]) -> str:
    """One pair's sentences: the differences shown (a † where Holm's correction keeps them), then what was not shown
    or not tested, each group in one clause."""
    parts = [sentence(c) + ("†" if c.holds_after_holm else "") for c in found if c.shown]
    groups: dict[tuple[bool, str], list[Comparison]] = {}
    for c in found:
        if not c.shown:
            groups.setdefault((c.p is None, seeds_text(c)), []).append(c)
    for (untested, seeds), group in sorted(groups.items()):
        if untested:
            parts.append(f"not tested on {', '.join(f'`{c.metric}`' for c in group)}: {seeds}")
        else:
            metrics = ", ".join(f"`{c.metric}` ({p_text(c.p)})" for c in group)
            parts.append(f"no difference shown on {metrics} with {seeds}")
    return "; ".join(parts)


def strongest(found: list[Comparison]) -> Comparison | None:
    """The difference shown with the most confidence: the smallest Holm p, then the largest t."""
    shown = [c for c in found if c.shown]

    def t(c: Comparison) -> float:
        spread = math.sqrt(sum(statistics.variance(v) / len(v) for v in (c.first_values, c.second_values)))
        return abs(c.difference) / spread if spread else math.inf

    return min(shown, key=lambda c: (c.holm, -t(c)), default=None)
