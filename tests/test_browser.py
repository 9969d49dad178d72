"""The MLflow UI and the compare report as a user sees them, in a real browser: a real `mlflow server` on loopback
holding a few tiny trained and evaluated runs and a short tuning study, opened in headless Chromium (Debian's
`chromium`, driven by Playwright for Python). Each test asserts what a user would look for (sizes, visibility,
where a link lands) and saves a screenshot (PNG) under $AETRACK_SCREENSHOT_DIR, or a temporary folder whose path
the session prints.

Skips where Playwright or Chromium is missing, unless AETRACK_REQUIRE_BROWSER=1 (set in CI), where it fails."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from aetrack import data as datasets
from aetrack.config import TrainConfig, TuneConfig
from aetrack.evaluation import Settings
from aetrack.models import REGISTRY
from aetrack.tracking.reports import compare
from aetrack.tracking import describe
from aetrack.tracking.workflows.evaluate import evaluate_run
from aetrack.tracking.metric_names import champion_metric
from aetrack.tracking.registry import run_score
from aetrack.tracking.run import TrackingOptions, train_tracked
from aetrack.tuning.space import space_for
from aetrack.tuning.study import tune_study, tuning_experiment
from conftest import start_mlflow_server, stop

CHROMIUM = os.environ.get("AETRACK_CHROMIUM", "/usr/bin/chromium")
EXPERIMENT, REGISTERED = "ui", "aetrack-digits-vae"
TINY = dict(hidden=(32,), latent_dim=2, batch_size=128, epochs=4, patience=0)
VIEWPORT = {"width": 1440, "height": 900}  # a laptop screen
LAPTOP_WIDTH = 1280
MIN_VISIBLE_PICTURE = 150  # pixels of a card's picture a user sees without scrolling inside the card


def browser_or_skip():
    """Playwright's sync API and a Chromium binary, or a skip (a failure with AETRACK_REQUIRE_BROWSER=1)."""
    required = os.environ.get("AETRACK_REQUIRE_BROWSER") == "1"
    why = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        why = "Playwright for Python is not installed (pip install -e '.[test]')"
    if why is None and not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        why = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if why:
        if required:
            pytest.fail(f"a browser is required (AETRACK_REQUIRE_BROWSER=1): {why}")
        pytest.skip(why)
    return sync_playwright


@pytest.fixture(scope="module")
def screenshots():
    folder = Path(os.environ.get("AETRACK_SCREENSHOT_DIR") or tempfile.mkdtemp(prefix="aetrack-screenshots-"))
    folder.mkdir(parents=True, exist_ok=True)
    yield folder
    print(f"\nbrowser screenshots: {folder}")


@pytest.fixture(scope="module")
def page():
    sync_playwright = browser_or_skip()
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        context = browser.new_context(viewport=VIEWPORT)
        page = context.new_page()
        page.set_default_timeout(60_000)
        yield page
        browser.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real `mlflow server` with what a user has after a short session: a vae, a cvae and an ae trained (the vae
    registered, `train` crowning it), the vae and the ae evaluated, a comparison report, then a two-epoch
    `aetrack tune` of the vae whose one trial registers a worse version."""
    browser_or_skip()  # no server, no training where the browser is missing
    root = tmp_path_factory.mktemp("ui-server")
    url, process = start_mlflow_server(root)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(url)
    try:
        digits = datasets.load("digits")
        options = TrackingOptions(experiment=EXPERIMENT, checkpoint_dir=str(root / "checkpoints"))
        runs = {}
        for name in ("vae", "cvae", "ae"):
            warmup = {"kl_warmup": 2} if name == "vae" else {}  # why its training loss rises, said on its page
            result = train_tracked(TrainConfig(model=name, **TINY, **warmup), digits, options, progress=False)
            runs[name] = result
        settings = Settings(iw_samples=8, nll_images=64, samples=300)
        for name in ("vae", "ae"):
            evaluate_run(runs[name].run_id, settings, echo=lambda _: None)
        client = MlflowClient(url)
        experiment_id = runs["vae"].experiment_id
        report = compare.build_report(compare.select_runs(client, EXPERIMENT)[1], client=client)
        report_run, _ = compare.publish(client, experiment_id, report, f"aetrack comparison: {EXPERIMENT}",
                                        output=root / "report")
        base = TrainConfig(model="vae", **{**TINY, "epochs": 2})
        space = space_for(REGISTRY["vae"], base, sampler="random", param_specs=("lr=float:1e-5:2e-5:log",),
                          fixed=set(TrainConfig.__dataclass_fields__) - {"lr"})
        tune_study(base, space, TuneConfig(n_trials=1, sampler="random", storage=f"sqlite:///{root}/optuna.db", threads=1),
                   tracking=TrackingOptions(experiment=tuning_experiment(EXPERIMENT), checkpoint_dir=str(root / "checkpoints")),
                   registered_model=REGISTERED, echo=lambda _: None, summary=lambda _: None)
        yield {"url": url, "client": client, "runs": runs, "experiment_id": experiment_id, "report_run": report_run,
               "report_dir": root / "report"}
    finally:
        mlflow.set_tracking_uri(previous)
        stop(process)


def shoot(page, folder: Path, name: str, full_page: bool = False) -> Path:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    assert path.stat().st_size > 10_000  # a page, not a blank
    return path


def open_ui(page, store, fragment: str) -> None:
    """A page of the MLflow UI, with MLflow's assistant panel closed (it covers a third of the screen)."""
    page.goto(f"{store['url']}/{fragment.lstrip('/')}" if fragment.startswith("#") else f"{store['url']}/#/{fragment}")
    page.wait_for_load_state("load")
    close = page.get_by_role("button", name="Close")
    try:
        close.first.click(timeout=8_000)
    except Exception:  # noqa: BLE001 - no assistant on this page or this version: nothing to close
        pass


def loaded_images(page, pattern: str) -> list[str]:
    """The sources of the page's images that have loaded and whose source matches `pattern`."""
    sources = page.locator("img").evaluate_all("all => all.filter(i => i.complete && i.naturalWidth > 0).map(i => i.src)")
    return [s for s in sources if re.search(pattern, s)]


# What a person sees of each picture in a card: its box clipped by the window and by every ancestor that scrolls or
# hides its overflow (MLflow's card body is a 250-pixel scrolling box; an <img>'s own height proves nothing).
VISIBLE_PICTURES = """key => {
  const title = [...document.querySelectorAll('*')].find(e => e.childElementCount === 0 && e.textContent.trim() === key);
  if (!title) return null;
  let card = title;
  while (card && !card.querySelector('img')) card = card.parentElement;
  const pictures = !card ? [] : [...card.querySelectorAll('img')].filter(i => i.complete && i.naturalWidth > 0).map(i => {
    const box = i.getBoundingClientRect();
    let top = Math.max(0, box.top), bottom = Math.min(innerHeight, box.bottom);
    for (let a = i.parentElement; a; a = a.parentElement) {
      if (/(auto|scroll|hidden|clip)/.test(getComputedStyle(a).overflowY)) {
        const clip = a.getBoundingClientRect();
        top = Math.max(top, clip.top); bottom = Math.min(bottom, clip.bottom);
      }
    }
    return {visible: Math.max(0, Math.round(bottom - top)), height: Math.round(box.height), natural: i.naturalWidth};
  });
  return {top: title.getBoundingClientRect().top, pictures};
}"""


def card_pictures(page, key: str) -> list[dict]:
    """The pictures of the image card `key` with how much of each a user sees, once the user has scrolled the card's
    title to the upper part of the window (MLflow draws a card only while it is in view)."""
    page.mouse.move(VIEWPORT["width"] // 2, VIEWPORT["height"] // 2)
    seen = None
    for _ in range(120):
        seen = page.evaluate(VISIBLE_PICTURES, key)
        if seen and seen["pictures"] and 150 <= seen["top"] <= 400:
            time.sleep(1)  # layout settles once the pictures have loaded
            return page.evaluate(VISIBLE_PICTURES, key)["pictures"]
        page.mouse.wheel(0, 150 if seen is None or seen["top"] > 400 else -150)
        time.sleep(0.4)
    raise AssertionError(f"no card {key} came into view: {seen}")


def test_the_experiment_link_aetrack_prints_lands_on_the_runs_table(page, store, screenshots):
    open_ui(page, store, describe.ui_page(store["experiment_id"]))
    for name in ("vae-normal-z2-digits", "cvae-normal-z2-digits", "ae-z2-digits"):
        page.get_by_text(name, exact=True).first.wait_for()
    assert "/overview" not in page.url and f"/experiments/{store['experiment_id']}/runs" in page.url
    assert page.get_by_text(re.compile("aetrack compare --experiment ui")).count() >= 1  # the experiment's description
    assert page.get_by_text("comparison", exact=True).count() == 0  # the report lives in ui-comparisons
    page.get_by_role("link", name="Models").first.wait_for()  # MLflow's model-training view, not GenAI's
    assert page.get_by_text("Judges", exact=True).count() == 0 and page.get_by_text("Sessions", exact=True).count() == 0
    experiment = store["client"].get_experiment(store["experiment_id"])
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    shoot(page, screenshots, "01-runs-table")


def test_a_run_page_shows_its_description_and_only_the_params_it_changed(page, store, screenshots):
    vae, ae = store["runs"]["vae"], store["runs"]["ae"]
    open_ui(page, store, describe.ui_page(store["experiment_id"], vae.run_id))
    page.get_by_text(re.compile("Best validation loss")).first.wait_for()
    assert page.get_by_text(re.compile(r"Test set \(aetrack evaluate\)")).count() >= 1
    assert page.get_by_text(re.compile("KL warm-up: the KL weight rises")).count() >= 1  # why loss/train rises
    assert page.get_by_text(re.compile("what ranks models for")).count() >= 1
    page.get_by_text("latent_dim", exact=True).first.wait_for()
    for default in ("prior", "prior_components", "train_samples", "seed", "noise_level"):
        assert page.get_by_text(default, exact=True).count() == 0, default
    shoot(page, screenshots, "02-run-page-vae")
    open_ui(page, store, describe.ui_page(store["experiment_id"], ae.run_id))
    page.get_by_text("latent_dim", exact=True).first.wait_for()
    for other in ("prior", "beta", "noise", "sparsity_weight", "labeled"):
        assert page.get_by_text(other, exact=True).count() == 0, other


def test_the_run_charts_are_sections_with_one_x_axis_each_and_readable_axes(page, store, screenshots):
    vae = store["runs"]["vae"]
    open_ui(page, store, describe.ui_page(store["experiment_id"], vae.run_id, "model-metrics"))
    for section in ("loss", "optim", "per_step", "progress", "result", "test", "val"):
        page.get_by_text(section, exact=True).first.wait_for()
    assert page.get_by_text("steps", exact=True).count() == 0  # the optimiser-step section says what its x is
    page.get_by_text("kl_scale", exact=True).first.wait_for()
    assert page.get_by_text("lr", exact=True).count() == 0  # a constant rate is the param, not a flat line at "0"
    shoot(page, screenshots, "03-run-charts")


def test_image_cards_show_their_pictures_in_the_run_view(page, store, screenshots):
    vae = store["runs"]["vae"]
    open_ui(page, store, describe.ui_page(store["experiment_id"], vae.run_id, "model-metrics"))
    for key in ("progress/reconstructions", "progress/samples"):
        pictures = card_pictures(page, key)
        assert pictures and pictures[0]["visible"] >= MIN_VISIBLE_PICTURE, (key, pictures)
    # The slider starts at step 0, where the untrained model's pictures are: never an empty card.
    assert loaded_images(page, r"progress~samples(%2B|\+)step(%2B|\+)0(%2B|\+)")
    shoot(page, screenshots, "04-image-cards-progress")
    for key in ("result/samples", "result/loss_curves"):
        pictures = card_pictures(page, key)
        assert pictures and pictures[0]["visible"] >= MIN_VISIBLE_PICTURE, (key, pictures)
    shoot(page, screenshots, "04b-image-cards-result")


def test_image_cards_show_their_pictures_in_the_experiment_view(page, store, screenshots):
    open_ui(page, store, describe.ui_page(store["experiment_id"]).replace("?", "?compareRunsMode=CHART&"))
    for key in ("progress/samples", "result/samples"):
        pictures = card_pictures(page, key)  # the first run's picture: the others are below it in the card
        assert pictures and pictures[0]["visible"] >= MIN_VISIBLE_PICTURE, (key, pictures)
    shoot(page, screenshots, "05-experiment-image-cards")


def test_full_screen_shows_the_picture_at_full_size(page, store, screenshots):
    vae = store["runs"]["vae"]
    open_ui(page, store, describe.ui_page(store["experiment_id"], vae.run_id, "model-metrics"))
    card_pictures(page, "progress/reconstructions")
    title = page.get_by_text("progress/reconstructions", exact=True).first
    title.locator("xpath=ancestor::div[.//button][1]").locator("button").first.click()  # the card's full-screen button
    time.sleep(2)
    shown = page.evaluate("() => [...document.images].filter(i => i.complete && /artifact/.test(i.src))"
                          ".map(i => [i.naturalWidth, Math.round(i.getBoundingClientRect().width)])")
    assert any(natural >= 512 and width >= 512 for natural, width in shown), shown  # not MLflow's 256-pixel thumbnail
    shoot(page, screenshots, "06-image-card-full-screen")
    page.keyboard.press("Escape")


def test_the_champion_is_the_best_version_and_versions_share_tag_names(page, store, screenshots):
    client = store["client"]
    versions = client.search_model_versions(f"name = '{REGISTERED}'")
    assert len(versions) == 2  # train's, and the tuning trial's
    metric = champion_metric(REGISTRY["vae"])
    scores = {str(v.version): run_score(client, v.run_id, metric) for v in versions}
    best = min(scores, key=scores.get)
    assert str(client.get_model_version_by_alias(REGISTERED, "champion").version) == best, scores
    assert all("val/best_loss" in v.tags and not any(k.startswith("val_") for k in v.tags) for v in versions)
    open_ui(page, store, f"models/{REGISTERED}/versions/{best}")
    page.get_by_text("champion", exact=False).first.wait_for()
    page.get_by_text("val/best_loss", exact=True).first.wait_for()
    page.get_by_text("test/nll_iw", exact=True).first.wait_for()
    shoot(page, screenshots, "09-champion-version")
    other = next(v for v in scores if v != best)
    open_ui(page, store, f"models/{REGISTERED}/versions/{other}")
    page.get_by_text("val/best_loss", exact=True).first.wait_for()
    assert page.get_by_text("champion", exact=True).count() == 0


def test_tuning_trials_are_named_by_what_they_try_in_their_own_experiment(page, store, screenshots):
    client = store["client"]
    tuning = client.get_experiment_by_name(tuning_experiment(EXPERIMENT))
    open_ui(page, store, describe.ui_page(tuning.experiment_id))
    page.get_by_text(re.compile(r"^study ")).first.wait_for()  # the parent; its trial is nested under it
    children = client.search_runs([tuning.experiment_id], "tags.mlflow.parentRunId != ''")
    assert [re.sub(r"lr=[0-9.e-]+", "lr=X", r.info.run_name) for r in children] == ["trial 0: lr=X"]
    shoot(page, screenshots, "10-tuning-experiment")


def test_the_comparison_report_fits_a_laptop_screen_and_opens_inside_the_ui(page, store, screenshots):
    report = store["report_dir"] / "report.html"

    def off_screen() -> list[str]:
        """The runs table's cells not wholly on screen: past the viewport, or hidden behind a sideways scroll of
        their box (the table was wider than the page, which cut off the red "not evaluated" column)."""
        return page.evaluate("""width => [...document.querySelectorAll('#runs th, #runs td')].filter(cell => {
            const right = cell.getBoundingClientRect().right;
            const box = cell.closest('.scroll');
            return right > width || (box && right > box.getBoundingClientRect().right + 0.5);
        }).map(cell => cell.textContent)""", LAPTOP_WIDTH)

    page.set_viewport_size({"width": LAPTOP_WIDTH, "height": 800})
    try:
        # Runs that differ in many settings, as after a few hand-tuned runs: the table keeps to the page.
        runs = compare.select_runs(store["client"], EXPERIMENT)[1]
        tried = {"vae": dict(hidden=(512, 256), latent_dim=16, epochs=546, prior="vamp", beta=4.0),
                 "cvae": dict(hidden=(256,), latent_dim=8, epochs=30, lr=3e-4, batch_size=64),
                 "ae": dict(hidden=(1024, 512, 256), epochs=30, likelihood="gaussian", lr=3e-3)}
        for run in runs:
            model = run.data.params["model"]
            run.data.params.update(TrainConfig(model=model, **tried[model]).to_params())
        wide = compare.build_report(runs)
        assert len(wide.varying) >= 6
        folder = store["report_dir"].parent / "many-settings"
        folder.mkdir(exist_ok=True)
        page.goto(compare.write_html(wide, "many settings differ", folder).as_uri())
        page.wait_for_load_state("load")
        assert page.evaluate("document.documentElement.scrollWidth") <= LAPTOP_WIDTH
        assert page.locator("td.missing").count() == 1 and off_screen() == []

        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        assert page.evaluate("document.documentElement.scrollWidth") <= LAPTOP_WIDTH
        assert page.locator("td.missing").all_inner_texts() == ["not evaluated"]  # the cvae
        assert off_screen() == []
        # The summary's command is code, not Markdown's backticks.
        assert page.locator("body > p code").first.inner_text() == "aetrack evaluate RUN_ID"
        assert "`" not in page.locator("body").inner_text()
        assert page.locator("#metrics td.best").count() >= 1
        images = page.locator("img")
        assert images.count() >= 4
        assert images.evaluate_all("all => all.every(i => i.complete && i.naturalWidth > 0)")
        assert page.get_by_text("lower is better", exact=False).count() >= 1  # the loss curves' axis, at least
        shoot(page, screenshots, "07-compare-report", full_page=True)
    finally:
        page.set_viewport_size(VIEWPORT)
    run = store["client"].get_run(store["report_run"])
    open_ui(page, store, f"experiments/{run.info.experiment_id}/runs/{run.info.run_id}/artifacts/comparison/report.html")
    frame = page.frame_locator("iframe").first
    frame.get_by_text("Test metrics", exact=True).wait_for()
    shoot(page, screenshots, "08-compare-report-in-mlflow")
