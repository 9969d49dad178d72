"""Pictures: image grids, reconstructions, samples, interpolations, latent plots, loss curves.
Every function returns a PIL image, ready for `mlflow.log_image`."""

from __future__ import annotations

import functools
import io
import math
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from aetrack.samplers import generate  # noqa: E402

MIN_GRID_WIDTH = 512  # MLflow's image cards and the compare report show a grid at up to this size: 8x8 digits need it
IMAGE_ROWS = 8  # images per row in every grid of samples, reconstructions and interpolations
PADDING = 2
RECONSTRUCTION_ROWS = ("input", "output")  # short labels: a picture near square fills MLflow's square card
DENOISING_ROWS = ("noisy input", "output", "clean")


def tile_scale(width: int, nrow: int) -> int:
    """The whole-number (nearest-neighbour) upscaling that makes a grid of `nrow` tiles at least MIN_GRID_WIDTH wide."""
    return max(1, math.ceil(MIN_GRID_WIDTH / (nrow * width)))


def tile(images: torch.Tensor, nrow: int, padding: int, pad_value: float) -> torch.Tensor:
    """(N, C, H, W) -> (3, rows, columns): `nrow` images a row, `padding` pixels of `pad_value` around each, grey
    images as RGB; what torchvision's `make_grid` draws, without importing torchvision (seconds of every start)."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    n, channels, height, width = images.shape
    columns, rows = min(nrow, n), math.ceil(n / min(nrow, n))
    out = torch.full((channels, rows * (height + padding) + padding, columns * (width + padding) + padding), pad_value)
    for i in range(n):
        top, left = (i // columns) * (height + padding) + padding, (i % columns) * (width + padding) + padding
        out[:, top:top + height, left:left + width] = images[i]
    return out


def grid(images: torch.Tensor, nrow: int = 8, *, row_labels: list[str] | None = None, title: str | None = None) -> Image.Image:
    """(N, C, H, W) in [0, 1] -> one PIL grid, upscaled by whole pixels (nearest neighbour: no blur) to at least
    MIN_GRID_WIDTH pixels wide; `row_labels` name the rows in a margin on the left, `title` goes above."""
    images = images.detach().float().cpu().clamp(0, 1)
    scale = tile_scale(images.shape[-1], min(nrow, len(images)))
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    tiles = tile(images, nrow, PADDING, 0.5)
    array = (tiles.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    picture = Image.fromarray(array)
    if row_labels or title:
        picture = label(picture, images.shape[-2] + PADDING, row_labels or [], title)
    return picture


def font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


MARGIN = 10  # white space around a label or a title: text never touches the picture's edge


def label(picture: Image.Image, row_height: int, row_labels: list[str], title: str | None) -> Image.Image:
    """`picture` with a white margin: each row's label on the left, vertically centred, and a title on top."""
    from PIL import ImageDraw

    text = font(max(16, min(24, row_height // 3)))
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    left = max((measure.textbbox((0, 0), t, font=text)[2] for t in row_labels), default=0)
    left = left + 2 * MARGIN if row_labels else 0
    top = text.size + 2 * MARGIN if title else 0
    wide = measure.textbbox((0, 0), title, font=text)[2] + 2 * MARGIN if title else 0
    out = Image.new(picture.mode, (max(picture.width + left, wide), picture.height + top), "white")
    out.paste(picture, (left, top))
    draw = ImageDraw.Draw(out)
    ink = "black" if picture.mode == "RGB" else 0
    for i, t in enumerate(row_labels):
        centre = top + PADDING + i * row_height + (row_height - PADDING) // 2
        draw.text((left - MARGIN, centre), t, font=text, fill=ink, anchor="rm")
    if title:
        draw.text((MARGIN, MARGIN), title, font=text, fill=ink)
    return out


def rows(*blocks: torch.Tensor, labels: tuple[str, ...] | None = None, per_row: int = IMAGE_ROWS) -> Image.Image:
    """Blocks of n images, `per_row` at a time, one row per block, named by `labels`: input over reconstruction
    (four times for 32 images: a square picture, which MLflow's thumbnails show large); noisy, output and clean
    for a dae."""
    n = blocks[0].shape[0]
    if n % per_row:
        per_row = n
    chunks = [block[start:start + per_row] for start in range(0, n, per_row) for block in blocks]
    row_labels = list(labels) * (n // per_row) if labels else None
    return grid(torch.cat(chunks), nrow=per_row, row_labels=row_labels)


def sample_grid(model, generator: torch.Generator, *, conditional: bool, num_classes: int, sampler=None) -> Image.Image:
    """8 x 8 samples; for a conditional model one row per label."""
    return sample_drawing(model, generator, conditional=conditional, num_classes=num_classes, sampler=sampler)()


@torch.no_grad()
def sample_drawing(model, generator: torch.Generator, *, conditional: bool, num_classes: int,
                   sampler=None) -> Callable[[], Image.Image]:
    """`sample_grid`'s samples drawn now, and what makes their picture: a call that another thread may make."""
    device = next(model.parameters()).device
    labels = torch.arange(num_classes, device=device).repeat_interleave(IMAGE_ROWS) if conditional else None
    count = IMAGE_ROWS * IMAGE_ROWS if labels is None else len(labels)
    row_labels = [f"label {c}" for c in range(num_classes)] if conditional else None
    return functools.partial(grid, generate(model, count, labels, generator, sampler=sampler), IMAGE_ROWS,
                             row_labels=row_labels)


FIGURE_DPI = 128  # a 5-inch figure is 640 pixels: at least MIN_GRID_WIDTH, full screen as in the report


def figure_to_image(fig) -> Image.Image:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def latent_scatter(points: np.ndarray, labels: np.ndarray, title: str) -> Image.Image:
    fig, ax = plt.subplots(figsize=(5, 5))
    scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=6, alpha=0.8)
    ax.legend(*scatter.legend_elements(), title="label", fontsize=7, loc="best")
    ax.set_title(title)
    return figure_to_image(fig)


def degenerate(z: np.ndarray, tolerance: float = 1e-6) -> str | None:
    """Why codes cannot be embedded (scikit-learn's t-SNE crashes the process on constant input), or None."""
    if len(z) < 4:
        return f"only {len(z)} codes"
    if not np.isfinite(z).all():
        return "codes that are not finite"
    if float(np.ptp(z, axis=0).max()) < tolerance:
        return "constant codes (a collapsed encoder)"
    return None


TSNE_POINTS = 750  # t-SNE's cost grows with the codes it embeds (2000 MNIST codes took ~14 s); 750 still show the classes
TSNE_DIMENSIONS = 50  # wider codes go through PCA to this many dimensions first, as t-SNE's authors advise
TSNE_ITERATIONS = 500  # 250 early-exaggeration steps and 250 more; scikit-learn's default of 1000 doubles the cost
TSNE_ANGLE = 0.8  # Barnes-Hut's accuracy (scikit-learn: 0.5): coarser cells, a faster gradient, the same clusters


def stratified(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Indices (sorted) of at most `count` items, each label's share kept (every label at least once), drawn with
    `seed`: the same codes for the same run."""
    if len(labels) <= count:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, sizes = np.unique(labels, return_counts=True)
    exact = count * sizes / len(labels)
    quota = np.minimum(sizes, np.maximum(1, np.floor(exact).astype(int)))
    for i in np.argsort(quota - exact):  # the remainder to the labels that were rounded down the most
        if quota.sum() >= count:
            break
        quota[i] += quota[i] < sizes[i]
    picks = [rng.choice(np.flatnonzero(labels == c), q, replace=False) for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picks))[:count]


def latent_plots(z: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, Image.Image]:
    """The latent space coloured by label: directly when 2-D, else PCA (all codes) and t-SNE (scikit-learn) of at
    most TSNE_POINTS codes, drawn per label, which the title says. Nothing for degenerate codes: there is no space to
    show, and t-SNE would crash on them."""
    if degenerate(z):
        return {}
    if z.shape[1] == 2:
        return {"latent_2d": latent_scatter(z, labels, "latent space")}
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    plots = {"latent_pca": latent_scatter(PCA(2, random_state=seed).fit_transform(z), labels, "latent space (PCA)")}
    chosen = stratified(labels, TSNE_POINTS, seed)
    codes, chosen_labels = z[chosen], labels[chosen]
    if degenerate(codes):
        return plots
    if codes.shape[1] > TSNE_DIMENSIONS:
        codes = PCA(TSNE_DIMENSIONS, random_state=seed).fit_transform(codes)
    perplexity = min(30.0, max(2.0, (len(codes) - 1) / 3))
    from threadpoolctl import threadpool_limits

    # One thread: on 2 cores, scikit-learn's OpenMP threads beside torch's took 3x as long as one thread alone.
    with threadpool_limits(1):
        embedded = TSNE(2, perplexity=perplexity, init="pca", max_iter=TSNE_ITERATIONS, angle=TSNE_ANGLE,
                        random_state=seed).fit_transform(codes)
    shown = f"{len(codes)} codes" if len(codes) == len(z) else f"{len(codes)} of {len(z)} codes, sampled per label"
    plots["latent_tsne"] = latent_scatter(embedded, chosen_labels, f"latent space (t-SNE of {shown})")
    return plots


def curves(history: list[dict[str, float]], keys: list[str], title: str = "loss curves",
           labels: list[str] | None = None, warmup: int = 0) -> Image.Image:
    """Each key's value per epoch on one chart (train and validation together); the first `warmup` epochs shaded
    and named: the KL weight rises there, and the training loss with it. Near square, as MLflow's cards are."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    epochs = [h["epoch"] for h in history]
    if warmup > 0:
        ax.axvspan(0.5, warmup + 0.5, color="orange", alpha=0.15, lw=0, label=f"KL warm-up (epochs 1-{warmup})")
    for key, text in zip(keys, labels or keys):
        ax.plot(epochs, [h[key] for h in history], marker="o" if len(epochs) <= 60 else None, label=text)
    ax.set_xlabel("epoch")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return figure_to_image(fig)


def interpolate(z_start: torch.Tensor, z_end: torch.Tensor, steps: int) -> torch.Tensor:
    """Straight-line interpolation: (pairs, D) x 2 -> (pairs * steps, D), row-major per pair."""
    t = torch.linspace(0, 1, steps, device=z_start.device).view(1, steps, 1)
    path = z_start.unsqueeze(1) * (1 - t) + z_end.unsqueeze(1) * t
    return path.reshape(-1, z_start.shape[-1])
