"""The MLflow UI and the compare report as a user sees them, in a real browser: a real `mlflow server` on loopback
holding a few tiny trained and evaluated runs, opened in headless Chromium (Debian's `chromium`, driven by
Playwright for Python). Each test asserts what a user would look for and saves a screenshot (PNG) under
$AETRACK_SCREENSHOT_DIR, or a temporary folder whose path the session prints.

Skips where Playwright or Chromium is missing, unless AETRACK_REQUIRE_BROWSER=1 (set in CI), where it fails."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from aetrack import data as datasets
from aetrack.config import TrainConfig
from aetrack.evaluation import Settings
from aetrack.tracking import compare, registry
from aetrack.tracking.evaluate import evaluate_run
from aetrack.tracking.run import TrackingOptions, train_tracked
from conftest import start_mlflow_server, stop

CHROMIUM = os.environ.get("AETRACK_CHROMIUM", "/usr/bin/chromium")
EXPERIMENT, REGISTERED = "ui", "aetrack-digits-vae"
TINY = dict(hidden=(32,), latent_dim=2, batch_size=128, epochs=4, patience=0)
VIEWPORT = {"width": 1440, "height": 900}  # a laptop screen
LAPTOP_WIDTH = 1280


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
    """A real `mlflow server` with what a user has after a short session: a vae, a cvae and an ae trained, the vae
    and the ae evaluated, the vae registered with the alias `champion`, and a comparison report."""
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
            result = train_tracked(TrainConfig(model=name, **TINY), digits, options, progress=False)
            runs[name] = result
        settings = Settings(iw_samples=8, nll_images=64, samples=300)
        for name in ("vae", "ae"):
            evaluate_run(runs[name].run_id, settings, echo=lambda _: None)
        client = MlflowClient(url)
        registry.promote(client, REGISTERED, runs["vae"].registered_version, "champion")
        experiment_id = runs["vae"].experiment_id
        report = compare.build_report(compare.select_runs(client, EXPERIMENT)[1], client=client)
        report_run, _ = compare.publish(client, experiment_id, report, f"aetrack comparison: {EXPERIMENT}",
                                        output=root / "report")
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
    page.goto(f"{store['url']}/#/{fragment}")
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


def test_the_runs_table_shows_what_each_run_is(page, store, screenshots):
    open_ui(page, store, f"experiments/{store['experiment_id']}/runs")
    for name in ("vae-normal-z2-digits", "cvae-normal-z2-digits", "ae-z2-digits"):
        page.get_by_text(name, exact=True).first.wait_for()
    assert page.get_by_text(re.compile("aetrack compare --experiment ui")).count() >= 1  # the experiment's description
    assert page.get_by_text("comparison", exact=True).count() == 0  # the report lives in ui-comparisons
    shoot(page, screenshots, "01-runs-table")


def test_a_run_page_shows_its_description_and_only_the_params_that_apply(page, store, screenshots):
    vae, ae = store["runs"]["vae"], store["runs"]["ae"]
    open_ui(page, store, f"experiments/{store['experiment_id']}/runs/{vae.run_id}")
    page.get_by_text(re.compile("Best validation loss")).first.wait_for()
    assert page.get_by_text(re.compile(r"Test set \(aetrack evaluate\)")).count() >= 1
    page.get_by_text("prior", exact=True).first.wait_for()
    assert page.get_by_text("noise_level", exact=True).count() == 0
    shoot(page, screenshots, "02-run-page-vae")
    open_ui(page, store, f"experiments/{store['experiment_id']}/runs/{ae.run_id}")
    page.get_by_text("latent_dim", exact=True).first.wait_for()
    for other in ("prior", "beta", "noise", "sparsity_weight", "labeled"):
        assert page.get_by_text(other, exact=True).count() == 0, other


def test_the_chart_view_has_sections_and_image_cards_from_step_0(page, store, screenshots):
    vae = store["runs"]["vae"]
    page.set_viewport_size({"width": VIEWPORT["width"], "height": 1800})
    try:
        open_ui(page, store, f"experiments/{store['experiment_id']}/runs/{vae.run_id}/model-metrics")
        for section in ("loss", "optim", "progress", "result", "steps", "test", "val"):
            page.get_by_text(section, exact=True).first.wait_for()
        shoot(page, screenshots, "03-run-charts")
        page.get_by_text("progress", exact=True).first.scroll_into_view_if_needed()
        # The slider starts at step 0, where the untrained model's pictures are: never an empty card.
        page.wait_for_function("() => [...document.images].some(i => i.complete && i.naturalWidth > 0 "
                               "&& /progress~reconstructions(%2B|\\+)step(%2B|\\+)0(%2B|\\+)/.test(i.src))")
        assert loaded_images(page, r"progress~samples(%2B|\+)step(%2B|\+)0(%2B|\+)")
        shoot(page, screenshots, "04-image-cards-step-0")
        page.get_by_text("result", exact=True).first.scroll_into_view_if_needed()
        page.mouse.move(VIEWPORT["width"] // 2, 900)
        page.mouse.wheel(0, 900)  # the second row of result cards: MLflow renders cards once they are in view
        # End-of-training pictures: one shared step, so a card shows every run's.
        page.wait_for_function("() => [...document.images].some(i => i.complete && i.naturalWidth > 0 "
                               "&& /result~samples/.test(i.src))")
        shoot(page, screenshots, "04b-image-cards-result")
    finally:
        page.set_viewport_size(VIEWPORT)


def test_the_registered_model_shows_its_alias_and_version_tags(page, store, screenshots):
    open_ui(page, store, f"models/{REGISTERED}")
    page.get_by_text("champion", exact=False).first.wait_for()
    assert page.get_by_text(re.compile("trained by aetrack on digits")).count() >= 1  # its description
    shoot(page, screenshots, "05-registered-model")
    version = store["runs"]["vae"].registered_version
    open_ui(page, store, f"models/{REGISTERED}/versions/{version}")
    page.get_by_text("val/best_loss", exact=True).first.wait_for()
    page.get_by_text("test/nll_iw", exact=True).first.wait_for()
    shoot(page, screenshots, "06-model-version")


def test_the_comparison_report_fits_a_laptop_screen_and_opens_inside_the_ui(page, store, screenshots):
    report = store["report_dir"] / "report.html"
    page.set_viewport_size({"width": LAPTOP_WIDTH, "height": 800})
    try:
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        assert page.evaluate("document.documentElement.scrollWidth") <= LAPTOP_WIDTH
        assert page.locator("td.missing").all_inner_texts() == ["not evaluated"]  # the cvae
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
