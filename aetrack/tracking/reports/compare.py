"""What `aetrack compare` reports: one report over an experiment's runs, as self-contained HTML (pictures inlined
as base64, so the MLflow UI shows it as it is) and as Markdown (pictures beside it). It fits a laptop screen:
a table of the runs (what differs, whether each was evaluated), a table of test metrics (one row per metric,
one column per run, the better value in bold, which way is better), the metrics in a few figures (against
`--by`, or one bar per run where several runs have a metric), the runs' validation loss curves (one panel per kind
of loss: only comparable quantities share an axis) and their sample grids side by side.

The report is logged as the artifacts `comparison/report.html`, `comparison/report.md` and
`comparison/images/` of a new run, tagged `aetrack.kind=comparison`, in the experiment `<experiment>-comparisons`:
the training runs' table and charts stay free of it (comparison, reference-classifier and tuning-study parent
runs are never themselves compared).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlflow

from aetrack.config import ConfigError, TrainConfig
from aetrack.models import REGISTRY
from aetrack.tracking import describe, lifecycle
from aetrack.tracking import metric_names as names
from aetrack.tracking import tags
from aetrack.tracking.reports.figures import (Row, bar_panel, better_label, group_order, line_panel,  # noqa: F401
                                      loss_curves, metric_figure, metric_groups, series)

# Settings that never describe a run's model (how it was logged or where it ran), and what `auto` resolved to.
IGNORED_PARAMS = {"device", "log_every"}
RESOLVED = "resolved_"
COMPARISONS_SUFFIX = "-comparisons"  # comparison runs live in `<experiment>-comparisons`
# Training's sample grids: images/<key><sep>step<sep>N<sep>timestamp<sep>T<sep>....png, the keys `result/samples` and
# `progress/samples` (stored as `result~samples`, `progress~samples`), or `samples` as older runs logged them.
_SAMPLES = re.compile(r"^(result~samples|progress~samples|samples)[+%]step[+%](\d+)[+%]timestamp[+%](\d+)[+%][^/]*(?<!compressed)\.png$")


@dataclass
class Report:
    rows: list[Row]
    varying: list[str]                  # params that differ between runs
    common: dict[str, str]              # params every run shares
    metrics: list[str]
    by: str | None
    plots: dict[str, object] = field(default_factory=dict)          # group of metrics -> PIL image
    samples: list[tuple[str, object]] = field(default_factory=list)  # (caption, PIL image)
    curves: object = None                                            # validation loss curves, PIL image


def select_runs(client, experiment: str, run_ids: list[str] | None = None,
                echo: Callable[[str], None] = print) -> tuple[str, list]:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ConfigError(f"no experiment named {experiment!r}")
    lifecycle.close_dead_runs(found.experiment_id, echo)  # a run left RUNNING by a dead process is not compared
    if run_ids:
        runs = [client.get_run(run_id) for run_id in run_ids]
        stray = [r.info.run_id for r in runs if r.info.experiment_id != found.experiment_id]
        if stray:
            raise ConfigError(f"run(s) {', '.join(stray)} are not in experiment {experiment!r}")
        return found.experiment_id, runs
    runs = client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'", max_results=5000,
                              order_by=["attributes.start_time ASC"])
    runs = [r for r in runs if tags.is_training_run(r.data.tags) and "model" in r.data.params]
    if not runs:
        raise ConfigError(f"experiment {experiment!r} has no finished aetrack training runs to compare")
    return found.experiment_id, runs


def comparison_experiment(client, experiment_id: str) -> str:
    """The experiment that holds the comparison runs of `experiment_id`'s runs: `<name>-comparisons`, made (with a
    description) on first use, so that reports never mix with the training runs in the runs table and charts."""
    from mlflow.exceptions import MlflowException

    name = client.get_experiment(experiment_id).name + COMPARISONS_SUFFIX
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    from aetrack.tracking.describe import NOTE

    try:
        return client.create_experiment(name, tags={NOTE: f"`aetrack compare` reports over the runs of the experiment "
                                                          f"`{name[:-len(COMPARISONS_SUFFIX)]}`: open a run's Artifacts "
                                                          "tab, comparison/report.html."})
    except MlflowException:  # another process (a study's worker on another host) made it since it was looked for
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def build_report(runs, *, by: str | None = None, metrics: tuple[str, ...] = (), client=None) -> Report:
    rows = [Row(r.info.run_id, r.info.run_name or r.info.run_id[:8], describe.full_params(r.data.params),
                {k: v for k, v in r.data.metrics.items() if names.is_test(k)}) for r in runs]
    keys = sorted(k for k in {k for row in rows for k in row.params} - IGNORED_PARAMS
                  if applies(k, rows) and not k.startswith(RESOLVED))
    varying = [k for k in keys if len({row.params.get(k) for row in rows}) > 1]
    common = {k: rows[0].params.get(k) for k in keys if k not in varying}
    if by and by not in keys:
        raise ConfigError(f"--by {by}: not a param of these runs (they have: {', '.join(keys)})")
    wanted = [names.test(m) for m in metrics]
    present = sorted({k for row in rows for k in row.metrics})
    missing = [m for m in wanted if m not in present]
    if missing:
        raise ConfigError(f"--metric {', '.join(missing)}: no selected run has it "
                          f"(evaluated metrics: {', '.join(present) or 'none; run aetrack evaluate first'})")
    report = Report(rows, varying, common, wanted or sorted(present, key=group_order), by)
    others = [k for k in varying if k != by]
    for group, members in metric_groups(report.metrics).items():
        if by:
            report.plots[group] = metric_figure(rows, members, lambda ax, m: line_panel(ax, rows, m, by, others))
        else:
            # A bar chart compares runs: only the metrics that two runs or more have get one.
            shared = [m for m in members if sum(m in row.metrics for row in rows) >= 2]
            if shared:
                report.plots[group] = metric_figure(rows, shared, lambda ax, m: bar_panel(ax, rows, m))
    if client is not None:
        report.curves = loss_curves(client, rows)
        report.samples = [(caption(row, varying), picture) for row in rows if (picture := sample_grid(client, row.run_id))]
    return report


def applies(param: str, rows: list[Row]) -> bool:
    """False for an option group that none of the runs' variants takes (say --noise-level when no run is a dae)."""
    fields = {f.name: f.metadata["scope"] for f in dataclasses.fields(TrainConfig)}
    scope = fields.get(param)
    if scope is None:
        return True
    return any(scope in REGISTRY[row.params["model"]].scopes for row in rows if row.params.get("model") in REGISTRY)


def caption(row: Row, varying: list[str]) -> str:
    settings = ", ".join(differences(row, varying))
    return f"{row.name}" + (f" ({settings})" if settings else "")


def sample_grid(client, run_id: str):
    """The run's evaluation sample grid, else the end-of-training one (`result/samples`), else the last `samples`
    image its training logged; None if it has none."""
    from PIL import Image

    evaluation = [a.path for a in client.list_artifacts(run_id, "evaluation")]
    path = "evaluation/samples.png" if "evaluation/samples.png" in evaluation else None
    if path is None:
        logged = [(m[1].startswith("result"), int(m[2]), int(m[3]), a.path) for a in client.list_artifacts(run_id, "images")
                  if (m := _SAMPLES.match(Path(a.path).name))]
        path = max(logged)[3] if logged else None
    if path is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, path, tmp)
        return Image.open(local).convert("RGB").copy()


def _value(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"


NOT_EVALUATED = "not evaluated"


def differences(row: Row, varying: list[str]) -> list[str]:
    """The run's settings that differ between the runs, as `name=value`, the model first; a param that its variant
    does not take (an ae's beta) is left out."""
    order = sorted(varying, key=lambda k: (k != "model", k))
    known = row.params.get("model") in REGISTRY
    return [f"{k}={row.params[k]}" for k in order if k in row.params and (applies(k, [row]) or not known)]


def runs_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """One row per run: its number (the metric table's column), name, id, the params that differ (in one cell, so
    that the table keeps to the page however many differ) and whether it was evaluated (a run without test metrics
    is named, not left as blank cells)."""
    header = ["#", "run", "run id", "settings that differ", "test metrics"]
    body = [[str(i), row.name, row.run_id, ", ".join(differences(row, report.varying)),
             f"{sum(m in row.metrics for m in report.metrics)}" if row.evaluated else NOT_EVALUATED]
            for i, row in enumerate(report.rows, 1)]
    return header, body


def metrics_table(report: Report) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """One row per metric, one column per run (by its number), and which cells hold the better value."""
    header = ["metric", "better", *(f"#{i}" for i in range(1, len(report.rows) + 1))]
    body, best = [], []
    for metric in report.metrics:
        values = [row.metrics.get(metric) for row in report.rows]
        known = [v for v in values if v is not None]
        pick = {"higher": max, "lower": min}.get(names.better(metric))
        top = pick(known) if pick and len(known) > 1 else None
        body.append([names.short(metric), better_label(metric) if names.better(metric) else "",
                     *(_value(v) for v in values)])
        best.append([False, False, *(v is not None and v == top for v in values)])
    return header, body, best


def _png(picture) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:60]


def summary(report: Report) -> str:
    unevaluated = [row for row in report.rows if not row.evaluated]
    text = f"{len(report.rows)} runs"
    if unevaluated:
        text += (f"; {len(unevaluated)} not evaluated (no test metrics: run `aetrack evaluate RUN_ID`): "
                 + ", ".join(f"#{report.rows.index(row) + 1} {row.name}" for row in unevaluated))
    return text + "."


def _figures(report: Report) -> list[tuple[str, str, object]]:
    """(heading, file name, picture) of every figure, the metrics (against --by) first."""
    against = f" against {report.by}" if report.by else " (one bar per run)"
    figures = [(f"{group.capitalize()} metrics{against}", f"{_slug(group)}.png", picture)
               for group, picture in report.plots.items()]
    if report.curves is not None:
        figures.append(("Validation losses per epoch, one panel per kind of loss", "loss-curves.png", report.curves))
    return figures


def write_markdown(report: Report, title: str, folder: Path) -> Path:
    """report.md with its pictures in images/ beside it."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", summary(report), ""]
    header, body = runs_table(report)
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |" for cells in body]
    if report.common:
        lines += ["", "Settings shared by every run: " + ", ".join(f"`{k}={v}`" for k, v in report.common.items()) + "."]
    if report.metrics:
        header, body, best = metrics_table(report)
        lines += ["", "## Test metrics", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(f"**{c}**" if b and c else c for c, b in zip(cells, marks)) + " |"
                  for cells, marks in zip(body, best)]
    for heading, file, picture in _figures(report):
        (folder / "images" / file).write_bytes(_png(picture))
        lines += ["", f"## {heading}", "", f"![{heading}](images/{file})"]
    if report.samples:
        lines += ["", "## Samples", ""]
    for i, (text, picture) in enumerate(report.samples):
        name = f"images/samples-{i:02d}-{_slug(text)}.png"
        (folder / name).write_bytes(_png(picture))
        lines += [f"**{text}**", "", f"![samples of {text}]({name})", ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def inline_markdown(text: str) -> str:
    """`text` as HTML, its `code` spans (Markdown, as the run's description shows them) as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _img(picture, alt: str) -> str:
    data = base64.b64encode(_png(picture)).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


PAGE_WIDTH = 1100  # pixels: a laptop screen, and MLflow's artifact viewer, show the report without scrolling sideways
STYLE = (
    f"body{{font-family:system-ui,sans-serif;margin:1.2em auto;max-width:{PAGE_WIDTH}px;padding:0 12px;color:#222}}"
    "h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}"
    ".scroll{overflow-x:auto;max-width:100%}"
    "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 7px;text-align:right;"
    "white-space:nowrap}th{background:#f3f3f3}td.text,th.text{text-align:left}td.id{font-family:monospace;"
    "font-size:11px;color:#666}td.best{font-weight:bold;background:#eaf3fb}td.missing{color:#b00;text-align:left}"
    "td.settings{white-space:normal;font-size:12px}.setting{white-space:nowrap;margin-right:.6em}"
    "td.name{white-space:normal;overflow-wrap:anywhere}"
    "code{font-size:.92em;background:#f3f3f3;padding:0 3px;border-radius:3px}"
    "img{max-width:100%}.samples{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:14px}"
    "figure{margin:0}figcaption{font-size:12px;margin-top:3px}.note{color:#555;font-size:13px}"
)


def write_html(report: Report, title: str, folder: Path) -> Path:
    """report.html: one file, every picture inlined, at most PAGE_WIDTH pixels wide."""
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{STYLE}</style>"
             f"</head><body><h1>{esc(title)}</h1><p>{inline_markdown(summary(report))}</p>"]
    header, body = runs_table(report)
    parts.append("<div class='scroll'><table id='runs'><tr>" + "".join(
        f"<th class='{'text' if i in (1, 2, 3) else ''}'>{esc(h)}</th>" for i, h in enumerate(header)) + "</tr>")
    for row, cells in zip(report.rows, body):
        # Each name=value stays whole; the cell wraps between them.
        settings = " ".join(f"<span class='setting'>{esc(item)}</span>" for item in differences(row, report.varying))
        missing = cells[-1] == NOT_EVALUATED
        parts.append(f"<tr><td>{esc(cells[0])}</td><td class='text name'>{esc(cells[1])}</td>"
                     f"<td class='text id'>{esc(cells[2])}</td><td class='text settings'>{settings}</td>"
                     f"<td class='{'missing' if missing else ''}'>{esc(cells[-1])}</td></tr>")
    parts.append("</table></div>")
    if report.common:
        parts.append("<p class='note'>Settings shared by every run: " + ", ".join(
            f"<code>{esc(k)}={esc(str(v))}</code>" for k, v in report.common.items()) + ".</p>")
    if report.metrics:
        header, body, best = metrics_table(report)
        parts.append("<h2>Test metrics</h2><p class='note'>One row per metric, one column per run (numbers as in the "
                     "table above); the better value in bold.</p><div class='scroll'><table id='metrics'><tr>"
                     + "".join(f"<th class='{'text' if i < 2 else ''}'>{esc(h)}</th>" for i, h in enumerate(header))
                     + "</tr>")
        for cells, marks in zip(body, best):
            parts.append("<tr>" + "".join(
                f"<td class='{'text' if i < 2 else 'best' if mark else ''}'>{esc(v)}</td>"
                for i, (v, mark) in enumerate(zip(cells, marks))) + "</tr>")
        parts.append("</table></div>")
    for heading, _, picture in _figures(report):
        parts.append(f"<h2>{esc(heading)}</h2><figure>{_img(picture, heading)}</figure>")
    if report.samples:
        parts.append("<h2>Samples</h2><div class='samples'>")
        parts += [f"<figure>{_img(p, t)}<figcaption>{esc(t)}</figcaption></figure>" for t, p in report.samples]
        parts.append("</div>")
    parts.append("</body></html>")
    path = folder / "report.html"
    path.write_text("\n".join(parts))
    return path


def publish(client, experiment_id: str, report: Report, title: str, *, output: Path | None = None,
            run_name: str = "comparison", log: bool = True) -> tuple[str | None, tuple[Path, Path] | None]:
    """Write report.html and report.md (into `output` when given) and log them to a new comparison run in the
    experiment `<experiment>-comparisons`. Returns that run's id (None without `log`) and the local paths (None
    without `output`)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(output) if output else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        html_path, md_path = write_html(report, title, folder), write_markdown(report, title, folder)
        run_id = None
        if log:
            from aetrack.tracking.describe import NOTE

            with mlflow.start_run(experiment_id=comparison_experiment(client, experiment_id), run_name=run_name) as run:
                mlflow.set_tags({tags.KIND: tags.KIND_COMPARISON, tags.COMPARED_EXPERIMENT: experiment_id,
                                 tags.COMPARED_RUNS: ",".join(r.run_id for r in report.rows)[:5000],
                                 NOTE: f"{title}. {summary(report)} Open the Artifacts tab: comparison/report.html."})
                mlflow.log_params({"by": report.by or "", "metrics": ",".join(report.metrics)[:500], "runs": len(report.rows)})
                mlflow.log_artifact(str(html_path), "comparison")
                mlflow.log_artifact(str(md_path), "comparison")
                mlflow.log_artifacts(str(folder / "images"), "comparison/images")
                run_id = run.info.run_id
    return run_id, ((html_path, md_path) if output else None)
