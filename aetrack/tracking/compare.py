"""What `aetrack compare` reports: one report over an experiment's runs, as self-contained HTML (pictures inlined
as base64, so the MLflow UI shows it as it is) and as Markdown (pictures beside it).

The report is logged as the artifacts `comparison/report.html`, `comparison/report.md` and
`comparison/images/` of a new run in the same experiment, tagged `aetrack.kind=comparison`
(comparison, reference-classifier and tuning-study parent runs are never themselves compared).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np

from aetrack import images
from aetrack.config import ConfigError, TrainConfig
from aetrack.models import REGISTRY
from aetrack.tracking import tags

# Settings that never describe a run's model (how it was logged or where it ran).
IGNORED_PARAMS = {"device", "log_every"}
# Training images logged as "samples" with a step: images/samples<sep>step<sep>N<sep>timestamp<sep>T<sep>....png
_SAMPLES = re.compile(r"^samples[+%]step[+%](\d+)[+%]timestamp[+%](\d+)[+%][^/]*(?<!compressed)\.png$")


@dataclass
class Row:
    run_id: str
    name: str
    params: dict[str, str]
    metrics: dict[str, float]


@dataclass
class Report:
    rows: list[Row]
    varying: list[str]                  # params that differ between runs
    common: dict[str, str]              # params every run shares
    metrics: list[str]
    by: str | None
    plots: dict[str, object] = field(default_factory=dict)          # metric -> PIL image
    samples: list[tuple[str, object]] = field(default_factory=list)  # (caption, PIL image)


def select_runs(client, experiment: str, run_ids: list[str] | None = None) -> tuple[str, list]:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ConfigError(f"no experiment named {experiment!r}")
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


def build_report(runs, *, by: str | None = None, metrics: tuple[str, ...] = (), client=None) -> Report:
    rows = [Row(r.info.run_id, r.info.run_name or r.info.run_id[:8], dict(r.data.params),
                {k: v for k, v in r.data.metrics.items() if k.startswith("test_")}) for r in runs]
    keys = sorted(k for k in {k for row in rows for k in row.params} - IGNORED_PARAMS if applies(k, rows))
    varying = [k for k in keys if len({row.params.get(k) for row in rows}) > 1]
    common = {k: rows[0].params.get(k) for k in keys if k not in varying}
    if by and by not in keys:
        raise ConfigError(f"--by {by}: not a param of these runs (they have: {', '.join(keys)})")
    wanted = [m if m.startswith("test_") else f"test_{m}" for m in metrics]
    present = sorted({k for row in rows for k in row.metrics})
    missing = [m for m in wanted if m not in present]
    if missing:
        raise ConfigError(f"--metric {', '.join(missing)}: no selected run has it "
                               f"(evaluated metrics: {', '.join(present) or 'none; run aetrack evaluate first'})")
    report = Report(rows, varying, common, wanted or present, by)
    for metric in report.metrics:
        report.plots[metric] = metric_plot(rows, metric, by, [k for k in varying if k != by])
    if client is not None:
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
    settings = ", ".join(f"{k}={row.params.get(k)}" for k in varying)
    return f"{row.name}" + (f" ({settings})" if settings else "")


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


def metric_plot(rows: list[Row], metric: str, by: str | None, others: list[str]):
    """`metric` against `by` (see `series`), spread over seeds as error bars; without `by`, one bar per run."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if not by:
        scored = [row for row in rows if metric in row.metrics]
        ax.bar(range(len(scored)), [row.metrics[metric] for row in scored])
        ax.set_xticks(range(len(scored)), [row.name for row in scored], rotation=45, ha="right", fontsize=7)
    else:
        lines = series(rows, metric, by, others)
        numeric = all(_number(v) is not None for line in lines.values() for v, *_ in line)
        categories = list(dict.fromkeys(v for line in lines.values() for v, *_ in line))
        for label, line in lines.items():
            xs = [_number(v) if numeric else categories.index(v) for v, *_ in line]
            ax.errorbar(xs, [m for _, m, _, _ in line], yerr=[s for _, _, s, _ in line], marker="o", capsize=3,
                        label=label or metric)
        if not numeric:
            ax.set_xticks(range(len(categories)), categories)
        ax.set_xlabel(by)
        if len(lines) > 1:
            ax.legend(fontsize=7)
    ax.set_ylabel(metric)
    ax.set_title(metric + (f" against {by}" if by else ""))
    ax.grid(alpha=0.3)
    return images.figure_to_image(fig)


def sample_grid(client, run_id: str):
    """The run's evaluation sample grid, else the last `samples` image its training logged; None if it has neither."""
    from PIL import Image

    names = [a.path for a in client.list_artifacts(run_id, "evaluation")]
    path = "evaluation/samples.png" if "evaluation/samples.png" in names else None
    if path is None:
        logged = [(int(m[1]), int(m[2]), a.path) for a in client.list_artifacts(run_id, "images")
                  if (m := _SAMPLES.match(Path(a.path).name))]
        path = max(logged)[2] if logged else None
    if path is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, path, tmp)
        return Image.open(local).convert("RGB").copy()


def _value(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"


def _table(report: Report) -> tuple[list[str], list[list[str]]]:
    header = ["run", "run id", *report.varying, *report.metrics]
    body = [[row.name, row.run_id, *(row.params.get(k, "") for k in report.varying),
             *(_value(row.metrics.get(m)) for m in report.metrics)] for row in report.rows]
    return header, body


def _png(picture) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:60]


def write_markdown(report: Report, title: str, folder: Path) -> Path:
    """report.md with its pictures in images/ beside it."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    header, body = _table(report)
    lines = [f"# {title}", "", f"{len(report.rows)} runs.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |" for cells in body]
    if report.common:
        lines += ["", "Settings shared by every run: " + ", ".join(f"`{k}={v}`" for k, v in report.common.items()) + "."]
    if report.plots:
        lines += ["", "## Metrics" + (f" against `{report.by}`" if report.by else ""), ""]
    for metric, picture in report.plots.items():
        name = f"images/{_slug(metric)}.png"
        (folder / name).write_bytes(_png(picture))
        lines.append(f"![{metric}]({name})")
    if report.samples:
        lines += ["", "## Samples", ""]
    for i, (text, picture) in enumerate(report.samples):
        name = f"images/samples-{i:02d}-{_slug(text)}.png"
        (folder / name).write_bytes(_png(picture))
        lines += [f"**{text}**", "", f"![samples of {text}]({name})", ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def _img(picture, alt: str) -> str:
    data = base64.b64encode(_png(picture)).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def write_html(report: Report, title: str, folder: Path) -> Path:
    """report.html: one file, every picture inlined."""
    header, body = _table(report)
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>",
             "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f3f3f3}"
             "td:first-child,td:nth-child(2){text-align:left;font-family:monospace}"
             ".row{display:flex;flex-wrap:wrap;gap:14px}figure{margin:0}figcaption{font-size:12px;max-width:420px}"
             "img{max-width:420px}</style></head><body>",
             f"<h1>{esc(title)}</h1><p>{len(report.rows)} runs.</p><table><tr>",
             "".join(f"<th>{esc(h)}</th>" for h in header), "</tr>"]
    parts += ["<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in cells) + "</tr>" for cells in body]
    parts.append("</table>")
    if report.common:
        parts.append("<p>Settings shared by every run: " + ", ".join(f"<code>{esc(k)}={esc(str(v))}</code>"
                                                                    for k, v in report.common.items()) + ".</p>")
    if report.plots:
        parts.append(f"<h2>Metrics{' against ' + esc(report.by) if report.by else ''}</h2><div class='row'>")
        parts += [f"<figure>{_img(p, m)}</figure>" for m, p in report.plots.items()]
        parts.append("</div>")
    if report.samples:
        parts.append("<h2>Samples</h2><div class='row'>")
        parts += [f"<figure>{_img(p, t)}<figcaption>{esc(t)}</figcaption></figure>" for t, p in report.samples]
        parts.append("</div>")
    parts.append("</body></html>")
    path = folder / "report.html"
    path.write_text("\n".join(parts))
    return path


def publish(client, experiment_id: str, report: Report, title: str, *, output: Path | None = None,
            run_name: str = "comparison", log: bool = True) -> tuple[str | None, tuple[Path, Path] | None]:
    """Write report.html and report.md (into `output` when given) and log them to a new comparison run.
    Returns that run's id (None without `log`) and the local paths (None without `output`)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(output) if output else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        html_path, md_path = write_html(report, title, folder), write_markdown(report, title, folder)
        run_id = None
        if log:
            with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run:
                mlflow.set_tags({tags.KIND: tags.KIND_COMPARISON, tags.COMPARED_RUNS: ",".join(r.run_id for r in report.rows)[:5000]})
                mlflow.log_params({"by": report.by or "", "metrics": ",".join(report.metrics)[:500], "runs": len(report.rows)})
                mlflow.log_artifact(str(html_path), "comparison")
                mlflow.log_artifact(str(md_path), "comparison")
                mlflow.log_artifacts(str(folder / "images"), "comparison/images")
                run_id = run.info.run_id
    return run_id, ((html_path, md_path) if output else None)
