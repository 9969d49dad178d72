"""Pictures as MLflow image cards: the files MLflow 3.17's chart view reads, written so that a card shows the
picture at full size."""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path

IMAGES_FOLDER = "images"         # where MLflow's UI looks for the pictures of a run's image cards
LOGGED_IMAGES = "mlflow.loggedImages"  # MLflow's own tag: the run has image cards
MAX_PREVIEW_SIDE = 1024          # the card's picture: full size up to this many pixels a side


def picture_files(key: str, step: int, timestamp: int | None = None) -> tuple[str, str]:
    """The two file names MLflow 3.17's image cards read for `key` at `step` (as `MlflowClient.log_image` names
    them): the PNG that a click on the card opens, and the `+compressed.webp` that the card and its full-screen
    view draw."""
    stem = f"{key.replace('/', '~')}+step+{step}+timestamp+{timestamp or int(time.time() * 1000)}+{uuid.uuid4()}"
    return f"{stem}.png", f"{stem}+compressed.webp"


def logged_pictures(client, run_id: str) -> list[tuple[str, int]]:
    """The (key, step) of every picture the run has, one per PNG (what `picture_files` names), in one listing."""
    found = []
    for artifact in client.list_artifacts(run_id, IMAGES_FOLDER):
        name = artifact.path.rsplit("/", 1)[-1]
        key, _, rest = name.partition("+step+")
        step = rest.split("+", 1)[0]
        if name.endswith(".png") and step.isdigit():
            found.append((key.replace("~", "/"), int(step)))
    return found


def log_picture(client, run_id: str, picture, key: str, step: int, *, mark: bool = True) -> None:
    """`picture` (PIL) as the run's image card `key` at `step`, like `MlflowClient.log_image` but with the card's
    picture at full size (lossless WebP) instead of MLflow's 256-pixel thumbnail: full screen, a 512-pixel grid then
    shows at 512 pixels, its labels readable, where MLflow's thumbnail shrinks them to 6 pixels."""
    png, webp = picture_files(key, step)
    preview = picture
    if max(picture.size) > MAX_PREVIEW_SIDE:
        preview = picture.copy()
        preview.thumbnail((MAX_PREVIEW_SIDE, MAX_PREVIEW_SIDE))
    with tempfile.TemporaryDirectory() as tmp:
        picture.save(Path(tmp) / png)
        preview.save(Path(tmp) / webp, lossless=True, method=2)  # method 2: a fraction of the default's time, ~same size
        client.log_artifacts(run_id, tmp, IMAGES_FOLDER)
    if mark:  # once a run is enough
        client.set_tag(run_id, LOGGED_IMAGES, "true")
