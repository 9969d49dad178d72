"""The compare report's figures: metrics grouped by what they measure, one panel per metric titled with the way
that is better (against `--by`, or one bar per run), and the compared runs' validation loss curves, one panel per
kind of loss."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from aetrack import images
from aetrack.tracking import metric_names as names


@dataclass
class Row:
    """One compared run, as the report's tables and figures read it."""
    run_id: str
    name: str
    params: dict[str, str]
    metrics: dict[str, float]          # its test/* metrics

    @property
    def evaluated(self) -> bool:
        return bool(self.metrics)


# Metrics grouped into a few figures, by what they measure (the first group whose words a metric's name holds).
GROUPS = {
    "reconstruction": ("recon", "mse", "psnr", "elbo", "nll", "kl"),
    "generation": ("fcd", "kid", "label_accuracy", "cas"),
    "representation": ("probe", "knn", "active_units", "error"),
    "code": ("activation", "near_zero", "jacobian"),
}


def group_of(metric: str) -> str:
    base = names.short(metric)
    return next((g for g, words in GROUPS.items() if any(w in base for w in words)), "other")


def group_order(metric: str) -> tuple[int, str]:
    return [*GROUPS, "other"].index(group_of(metric)), metric


def metric_groups(metrics: list[str]) -> dict[str, list[str]]:
    """The metrics by group, groups in GROUPS' order."""
    groups: dict[str, list[str]] = {}
    for metric in sorted(metrics, key=group_order):
        groups.setdefault(group_of(metric), []).append(metric)
    return groups


def better_label(metric: str) -> str:
    direction = names.better(metric)
    return f"{direction} is better" if direction else "no better direction"


COLUMNS = 3
PANEL = (3.6, 2.6)  # inches per panel: three across fill a 1100-pixel page at 100 dpi


def metric_figure(rows: list[Row], metrics: list[str], draw):
    """One figure of up to three panels a row, one panel per metric, each titled with the way that is better."""
    import matplotlib.pyplot as plt

    columns = min(COLUMNS, len(metrics))
    lines = -(-len(metrics) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(PANEL[0] * columns, PANEL[1] * lines), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        draw(ax, metric)
        ax.set_title(f"{names.short(metric)}  ({better_label(metric)})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if len(labels) > 1:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False,
                   bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout()
    return images.figure_to_image(fig)


def run_label(rows: list[Row], row: Row) -> str:
    return f"#{rows.index(row) + 1} {row.name}"[:28]


def bar_panel(ax, rows: list[Row], metric: str) -> None:
    """One horizontal bar per run that has `metric`, run labels readable without rotation; the best bar darker."""
    scored = [row for row in rows if metric in row.metrics]
    values = [row.metrics[metric] for row in scored]
    best = {"higher": max, "lower": min}.get(names.better(metric))
    colours = ["#1f77b4" if best and v == best(values) else "#9ecae1" for v in values]
    ax.barh(range(len(scored)), values, color=colours)
    ax.set_yticks(range(len(scored)), [run_label(rows, row) for row in scored], fontsize=7)
    ax.invert_yaxis()


def line_panel(ax, rows: list[Row], metric: str, by: str, others: list[str]) -> None:
    lines = series(rows, metric, by, others)
    numeric = all(_number(v) is not None for line in lines.values() for v, *_ in line)
    categories = list(dict.fromkeys(v for line in lines.values() for v, *_ in line))
    for label, line in lines.items():
        xs = [_number(v) if numeric else categories.index(v) for v, *_ in line]
        ax.errorbar(xs, [m for _, m, _, _ in line], yerr=[s for _, _, s, _ in line], marker="o", capsize=3,
                    label=label or names.short(metric))
    if not numeric:
        ax.set_xticks(range(len(categories)), categories)
    elif len(categories) > 2 and all(_number(v) > 0 for v in categories):
        values = sorted(_number(v) for v in categories)
        if values[-1] / values[0] >= 8:  # latent sizes 2, 8, 32: evenly spaced on a log axis
            ax.set_xscale("log", base=2)
    ax.set_xlabel(by, fontsize=8)


# What each validation curve measures, so that only like is drawn with like: every model's reconstruction term, and
# the bound of the generative ones, apart for the conditional ones (a bound on -log p(x|y), which knows the label,
# is not a bound on -log p(x)). A run's own loss (loss/val) mixes these with penalties, beta and KL warm-up: an AE's
# reconstruction loss would look better than a VAE's -ELBO on one axis.
RECONSTRUCTION = ("val/recon_loss", "reconstruction term −log p(x|z)")
BOUND = ("val/neg_elbo", "−ELBO, a bound on −log p(x)")
CONDITIONAL_BOUND = ("val/neg_elbo", "conditional −ELBO, a bound on −log p(x|y)")


def loss_kinds(row: Row) -> list[tuple[str, str]]:
    """(metric, what it is) of the validation curves `row` is drawn in: its reconstruction term, and its bound if
    it generates; a run of an unknown model (or older, without the parts) gets its own loss in a panel of its model."""
    from aetrack.models import REGISTRY

    variant = REGISTRY.get(row.params.get("model", ""))
    if variant is None:
        return [own_loss(row)]
    kinds = [RECONSTRUCTION]
    if variant.generative:
        kinds.append(CONDITIONAL_BOUND if variant.conditional else BOUND)
    return kinds


def own_loss(row: Row) -> tuple[str, str]:
    return names.VAL_LOSS, f"{row.params.get('model', '?')}'s training loss"


def loss_panels(client, rows: list[Row]) -> dict[tuple[str, str], list[tuple[Row, list[tuple[int, float]]]]]:
    """(metric, title) -> the runs drawn on that panel with their (epoch, value) history: one panel per kind of loss
    (see `loss_kinds`), per data set and likelihood where the runs differ in them (nats compare within one only)."""
    settings = {row.run_id: tuple(row.params.get(k, "") for k in ("dataset", "likelihood")) for row in rows}
    several = len(set(settings.values())) > 1
    panels: dict[tuple[str, str], list[tuple[Row, list[tuple[int, float]]]]] = {}
    for row in rows:
        curves = [(metric, what, history) for metric, what in loss_kinds(row)
                  if (history := client.get_metric_history(row.run_id, metric))]
        if not curves:  # logged before the loss's parts were: its own loss, on a panel of its model
            metric, what = own_loss(row)
            curves = [(metric, what, client.get_metric_history(row.run_id, metric))]
        for metric, what, history in curves:
            if history:
                title = f"{what}\n({metric}, {', '.join(settings[row.run_id])})" if several else f"{what}\n({metric})"
                panels.setdefault((metric, title), []).append((row, sorted((m.step, m.value) for m in history)))
    return panels


def loss_curves(client, rows: list[Row], limit: int = 12):
    """The validation losses per epoch of (up to `limit` of) the compared runs, one panel per kind of loss
    (`loss_panels`), one line per run, a run's colour the same in every panel; None without history."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = rows[:limit]
    panels = loss_panels(client, rows)
    if not panels:
        return None
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    columns = min(COLUMNS, len(panels))
    lines = -(-len(panels) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(PANEL[0] * COLUMNS, 3.6 * lines), squeeze=False)
    for ax, ((metric, title), histories) in zip(axes.flat, panels.items()):
        for row, history in histories:
            ax.plot([s for s, _ in history], [v for _, v in history], label=run_label(rows, row), linewidth=1.2,
                    color=colours[rows.index(row) % len(colours)])
        # The first epochs' losses dwarf the rest: show the range where the runs differ.
        finals = [v for _, h in histories for _, v in h[len(h) // 10:]]
        low, high = min(finals), max(finals)
        ax.set_ylim(low - 0.05 * (high - low or 1), high + 0.2 * (high - low or 1))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("nats per image (lower is better)" if metric != names.VAL_LOSS else "lower is better", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(histories) > 6 else 1)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return images.figure_to_image(fig)


def _number(text: str | None) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def series(rows: list[Row], metric: str, by: str, others: list[str]) -> dict[str, list[tuple[str, float, float, int]]]:
    """Points of `metric` against `by`: one line per combination of the other varying params, each point
    (by value, mean, std, runs) in `by` order (numeric when every value is a number). Runs that differ only
    by seed fall on the same point."""
    grouping = [k for k in others if k != "seed"]
    points: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if metric in row.metrics:
            label = ", ".join(f"{k}={row.params.get(k)}" for k in grouping)
            points[label][row.params.get(by)].append(row.metrics[metric])
    values = {v for line in points.values() for v in line}
    numeric = all(_number(v) is not None for v in values)
    key = _number if numeric else (lambda v: str(v))
    return {label: [(v, float(np.mean(line[v])), float(np.std(line[v])), len(line[v])) for v in sorted(line, key=key)]
            for label, line in points.items()}
