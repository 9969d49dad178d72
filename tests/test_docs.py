"""The documentation: README short, every page in the site's navigation, and every measured figure on the checked
pages taken from its record in benchmarks/results/ (rendered by benchmarks/render_docs.py; a hand edit fails here)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import render_docs  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
# The pages whose every number must be in a record, and the records each may quote.
CHECKED = {
    "docs/performance.md": ["startup.json", "training-mnist.json", "evaluation.json", "priors.json", "serving.json",
                            "serving-load.json", "tuning.json", "defaults*.json", "recipes.jsonl", "anchors.json",
                            "surroundings.json"],
    "docs/anchors.md": ["anchors.json"],
    "docs/defaults.md": ["defaults*.json", "recipes.jsonl"],
    # a study's page quotes its tables (means and spreads), not the single runs behind them
    **{f"docs/studies/{page.name}": ["questions/*.json:table"] for page in (REPO / "docs" / "studies").glob("*.md")},
}
# Numbers that are settings, names or citations, not measurements: the published protocols' own figures and
# sizes, the grids the studies train. A measured figure never belongs here: it goes in a rendered block.
SETTINGS = {
    "0", "1", "2", "3", "4", "5", "6", "8", "10", "16", "20", "32", "40", "50", "64", "100", "128", "200", "250", "256",
    "300", "400", "500", "784", "1000", "2000", "3280", "5000", "10000",
    "0.01", "0.1", "0.3", "0.5", "1e-3", "1e-2", "2e-3", "3e-4", "3e-3", "1e-4", "0.05",
    "84", "86.76", "84.78", "85.54", "85.57", "88.56", "81.02", "11.97", "3.33", "104.6", "105.6",
}
NUMBER = re.compile(r"(?<![\w.\-/@])(\d+(?:\.\d+)?(?:e-?\d+)?)(?![\w/@]|\.\d)")
IGNORED = [
    re.compile(r"<!-- render: (?P<name>[\w@.:-]+) -->\n.*?<!-- /render: (?P=name) -->", re.S),  # checked by rendering
    re.compile(r"^```.*?^```", re.S | re.M),  # commands and their output
    re.compile(r"`[^`\n]*`"),  # inline code: options, file names, commands
    re.compile(r"\]\([^)]*\)"),  # link targets
    re.compile(r"\d+(?:x\d+)+|\d+(?:-\d+)+"),  # image shapes (1x28x28) and layer sizes (784-400-20)
    re.compile(r"<!--.*?-->", re.S),
    re.compile(r"[A-Z][a-z]+(?: et al\.| & [A-Z][a-z]+)? \d{4}"),  # citations: Burda et al. 2015, Hutchinson 1990
]


def record_numbers(patterns: list[str]) -> list[float]:
    """Every number in the records (`PATTERN:KEY`: only under KEY), those inside strings too (a study's table, a
    note); not the anchors' validation curves, thousands of values that would match almost any figure by chance."""
    found: list[float] = []

    def walk(value, key=""):
        if key == "curve":
            return
        if isinstance(value, bool):
            return
        if isinstance(value, (int, float)):
            found.append(float(value))
        elif isinstance(value, str):
            found.extend(float(n) for n in re.findall(r"\d+(?:\.\d+)?", value))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, k)
        elif isinstance(value, list):
            for v in value:
                walk(v, key)

    for spec in patterns:
        pattern, _, key = spec.partition(":")
        for path in sorted(RESULTS.glob(pattern)):
            lines = path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
            for line in lines:
                if line.strip():
                    value = json.loads(line)
                    walk(value[key] if key else value)
    return found


def holds(numbers: list[float], text: str) -> bool:
    """Whether some record value, as a figure, a percentage of a fraction, or seconds as minutes or hours, is `text`
    at the precision `text` is written with."""
    decimals = len(text.split(".")[1]) if "." in text else 0
    value, tolerance = float(text), 0.5 * 10 ** -decimals + 1e-9
    return any(abs(v * scale - value) <= tolerance for v in numbers for scale in (1, 100, 1 / 60, 1 / 3600))


def unrecorded(page: str) -> list[str]:
    text = (REPO / page).read_text()
    for pattern in IGNORED:
        text = pattern.sub(" ", text)
    numbers = record_numbers(CHECKED[page])
    return [n for n in NUMBER.findall(text) if n not in SETTINGS and not holds(numbers, n)]


@pytest.mark.parametrize("page", sorted(CHECKED))
def test_every_number_on_a_checked_page_is_in_its_record(page):
    assert unrecorded(page) == [], f"{page}: numbers that no record in {CHECKED[page]} holds"


def test_every_rendered_block_is_what_its_record_gives():
    stale = render_docs.stale_pages()
    assert stale == [], f"figures that differ from their records (python benchmarks/render_docs.py): {stale}"


def test_the_checked_pages_render_their_figures():
    for page in ("docs/performance.md", "docs/anchors.md", "docs/defaults.md"):
        assert "<!-- render: " in (REPO / page).read_text(), page
    for path in sorted((RESULTS / "questions").glob("*@*.json")):
        study = path.stem.split("@")[0]
        text = (REPO / "docs" / "studies" / f"{study}.md").read_text()
        order = [text.index(f"<!-- render: verdicts:{path.stem} -->"), text.index(f"]({study}.png)"),
                 text.index(f"<!-- render: questions:{path.stem} -->"), text.index(f"<!-- render: tests:{path.stem} -->")]
        assert order == sorted(order), f"{study}: the verdict, its picture, the table, then the tests"
    assert "<!-- render: studies-verdicts -->" in (REPO / "docs" / "studies" / "index.md").read_text()


# A sentence that compares settings: on a study page it belongs in a block rendered from the record, never typed.
VERDICT = re.compile(r"\b(beats?|no difference|makes? no difference|within (?:the|a few|its) spreads?|outperforms?|"
                     r"(?:better|worse|higher|lower|more|less|above|below) than|slightly (?:lower|higher|better|worse)|"
                     r"by a wide margin|comes? close|the (?:best|worst)|hundreds of times)\b", re.I)


def typed_verdicts(text: str) -> list[str]:
    """The sentences of `text`, outside its rendered blocks, code and comments, that state a comparison."""
    rendered, code, comments = IGNORED[0], IGNORED[1], IGNORED[5]
    assert comments.pattern == "<!--.*?-->"
    for pattern in (rendered, code, comments):
        text = pattern.sub(" ", text)
    sentences = re.split(r"(?<=[.!?])\s+|\n\s*\n", text)
    return [" ".join(s.split()) for s in sentences if VERDICT.search(s)]


def study_words() -> set[str]:
    """What names a study's settings: the studies' names and every value of their records' settings."""
    words = set()
    for path in (RESULTS / "questions").glob("*@*.json"):
        words.add(path.stem.split("@")[0])
        for cell in json.loads(path.read_text())["cells"]:
            words |= {str(v).lower() for v in cell["setting"].values() if isinstance(v, str)}
    return {w for w in words if len(w) > 2}  # not `kl` or `l1`: words of "the KL warm-up", not names of a setting


@pytest.mark.parametrize("page", sorted(str(p.relative_to(REPO)) for p in (REPO / "docs" / "studies").glob("*.md")))
def test_a_study_page_states_no_verdict_but_those_rendered_from_its_record(page):
    assert typed_verdicts((REPO / page).read_text()) == [], f"{page}: typed verdicts (render them from the record)"


def test_the_readme_states_no_study_verdict_and_quotes_its_tables_figures_as_recorded():
    readme = (REPO / "README.md").read_text()
    words = study_words()
    claims = [s for s in typed_verdicts(readme) if words & set(re.findall(r"[\w-]+", s.lower()))]
    assert claims == [], "the README states verdicts of a study: link to its page instead"
    tables = " ".join(json.loads(p.read_text())["table"] for p in (RESULTS / "questions").glob("*@*.json"))
    quoted = re.findall(r"\d+(?:\.\d+)? ± \d+(?:\.\d+)?", readme)
    assert quoted and [q for q in quoted if q not in tables] == [], "figures the studies' records do not hold"


def test_a_typed_or_edited_verdict_fails():
    """The checks themselves: the typed verdict that contradicted question 1's table, and a verdict edited inside
    its block, are both caught."""
    page = (REPO / "docs" / "studies" / "latent-size.md").read_text()
    typed = page.replace("![", "The VAE's architecture makes no difference within the spread.\n\n![", 1)
    assert typed_verdicts(typed) == ["The VAE's architecture makes no difference within the spread."]
    won = re.search(r"(\S+) beats (\S+) on", page)  # the first verdict rendered on the page, turned round
    edited = page.replace(won.group(0), f"{won.group(2)} beats {won.group(1)} on", 1)
    assert edited != page and render_docs.render(edited) == page


def test_a_record_of_an_earlier_grid_says_so_on_its_page():
    from aetrack.tracking.workflows.studies import STUDIES

    grid = STUDIES["latent-size"].grid
    record = {"study": "latent-size", "dataset": "digits", "machine": {"date": "2026-11-25 16:59 UTC"},
              "cells": [{"setting": {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()}} for s in grid]}
    assert render_docs.earlier_grid(record) == ""  # the grid as it is, tuples read back from JSON as lists
    record["cells"] = record["cells"][:5] + [{"setting": {"model": "ae", "latent_dim": 16}}]
    assert render_docs.earlier_grid(record).startswith(
        f"**An earlier grid:** this record (digits, 2026-11-25 16:59 UTC) measured 6 settings, of which 5 are in the "
        f"study's grid today of {len(grid)}")


def test_every_study_picture_is_drawn_from_its_current_record():
    assert render_docs.stale_pictures() == [], "python benchmarks/render_docs.py draws them again"


def test_a_hand_edited_figure_fails(tmp_path):
    """The check itself: one figure changed by hand inside a block, or typed outside one, is caught."""
    page = (REPO / "docs" / "anchors.md").read_text()
    edited = page.replace("**86.67 nats**", "**86.57 nats**", 1)
    assert edited != page and render_docs.render(edited) != edited
    numbers = record_numbers(["anchors.json"])
    assert holds(numbers, "86.67") and not holds(numbers, "86.57")


def test_readme_is_short_and_links_into_the_docs():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    first_screen = "\n".join(readme.splitlines()[:40])
    assert not re.search(r"\d+ (tests|passed)|\d+ min \d+ s", first_screen), "test counts and CI timings change"
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (REPO / link).exists(), link


def nav_pages(items) -> list[str]:
    found = []
    for item in items:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        found += nav_pages(value) if isinstance(value, list) else [value]
    return found


def test_every_page_is_in_the_navigation():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    listed = set(nav_pages(config["nav"]))
    pages = {str(p.relative_to(REPO / "docs")) for p in (REPO / "docs").rglob("*.md")}
    assert pages == listed, f"not in mkdocs.yml's nav: {pages - listed}; missing: {listed - pages}"


def test_help_lists_commands_in_the_order_a_user_meets_them():
    from click.testing import CliRunner

    from aetrack.cli import main

    text = CliRunner().invoke(main, ["--help"]).output
    assert "Start here: `aetrack train`" in " ".join(text.split())
    order = [text.index(f"\n  {name} ") for name in ("train", "evaluate", "compare", "study", "serve", "tune", "server")]
    assert order == sorted(order)


def test_train_help_shows_its_options_in_groups_with_examples():
    from click.testing import CliRunner

    from aetrack.cli import main

    text = CliRunner().invoke(main, ["train", "--help"]).output
    titles = ["Model:", "Data:", "Optimisation and schedule:", "Tracking:", "Resume:"]
    assert [text.index(f"\n{title}\n") for title in titles] == sorted(text.index(f"\n{title}\n") for title in titles)
    assert text.count("\n    aetrack train") == 2  # the two examples
    headings = [line for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    for option, group in (("--lr-schedule", "Optimisation and schedule:"), ("--prior", "Variant options"),
                          ("--tracking-uri", "Tracking:"), ("--resume", "Resume:"), ("--dataset", "Data:")):
        line = text.index(f"\n  {option} ")
        assert [h for h in headings if text.index(f"\n{h}\n") < line][-1].startswith(group), option


def test_every_train_option_is_in_a_help_group():
    from aetrack.cli.options import GroupedHelp
    from aetrack.cli.train import train

    assert isinstance(train, GroupedHelp)
    grouped = {option.name for group in train.option_groups for option in group.options}
    assert grouped == {p.name for p in train.params if p.name != "help"}


@pytest.mark.parametrize("command, settings", [("train", "TrainConfig"), ("train", "TrackingOptions"), ("tune", "TrainConfig"),
                                               ("tune", "TuneConfig"), ("tune", "TrackingOptions"), ("evaluate", "Settings")])
def test_each_option_of_a_settings_dataclass_is_generated_from_its_field(command, settings):
    """One help and one default per setting, in its dataclass: no command writes such an option by hand."""
    import dataclasses

    from aetrack import config, evaluation_settings
    from aetrack.cli.main import main

    cls = getattr(config, settings, None) or getattr(evaluation_settings, settings)
    params = {p.name: p for p in main.commands[command].params}
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            option = params[f.name]
            assert option.help.startswith(f.metadata["help"]), (command, f.name)
            assert option.default in (f.default, config.format_value(f.default)), (command, f.name)
