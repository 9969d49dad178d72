"""MLflow around the training loop: params, tags, data set, metrics (asynchronous),
images with steps, the logged pyfunc model and its registry version.

The tracking URI is the caller's to set (the CLI does, once); this module only uses it."""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import math
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlflow
import torch

import aetrack
from aetrack import checkpoints, images, modelio, samplers
from aetrack.config import TrackingOptions, TrainConfig  # noqa: F401 (TrackingOptions: re-exported)
from aetrack.data import Splits
from aetrack.images import IMAGE_ROWS
from aetrack.models import REGISTRY, build_model
from aetrack.tracking import artifacts, describe, lifecycle, recovery, registry
from aetrack.tracking.describe import applies, resolved_tags, run_params  # noqa: F401 (re-exported)
from aetrack.tracking import metric_names as names
from aetrack.tracking import tags as tag
from aetrack.tracking.artifacts import log_generator
from aetrack.tracking.lifecycle import Interrupted, MetricBuffer  # noqa: F401 (MetricBuffer: re-exported)
from aetrack.tracking.recovery import (CHECKPOINT_ARTIFACT, RunDiverged, RunStopped, open_checkpoint,  # noqa: F401 (re-exported)
                                       persist, say)
from aetrack.tracking.pictures import logged_pictures
from aetrack.tracking.registry import describe_version
from aetrack.training import Diverged, History, fit, init_output_biases

IMAGE_STEPS = 50  # at most this many steps per image key: the UI's step slider stays usable, the store small


def image_epochs(epochs: int) -> set[int]:
    """The epochs whose pictures are logged during training: the first and every k-th, at most IMAGE_STEPS - 2
    (step 0, before training, and the best epoch's pictures, logged at the end, add up to two)."""
    every = max(1, math.ceil(epochs / (IMAGE_STEPS - 3)))
    return {1} | set(range(every, epochs + 1, every))


@dataclass
class RunResult:
    run_id: str
    experiment_id: str
    tracking_uri: str
    model_uri: str
    registered_model: str | None = None
    registered_version: str | None = None
    history: History = field(default_factory=History)
    logged_model_uri: str | None = None  # the logged model itself (models:/m-...), registrable
    crowning: registry.Crowning | None = None  # where `@champion` stands after the model was registered


def registered_name(config: TrainConfig) -> str:
    """The registry's name of a run's model unless --registered-model gives one (and a study's unless --study-name
    does): built here only."""
    return f"aetrack-{config.dataset}-{config.model}"


def git_commit() -> str | None:
    """HEAD of aetrack's checkout, with `-dirty` when tracked files differ from it (the code run is then not HEAD's)."""
    where = Path(aetrack.__file__).parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=where)
        # Only code counts: the README and the results that benchmarks write do not make a run dirty.
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top,glob)**/*.py",
                                  ":(top)pyproject.toml", ":(top)constraints.txt"], capture_output=True, text=True,
                                 timeout=5, cwd=where)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return out.stdout.strip() + ("-dirty" if changed.returncode == 0 and changed.stdout.strip() else "")


EPOCH_IMAGES, FINAL_IMAGES = "progress/", "result/"  # image keys: a section each in the UI's chart view
FINAL_STEP = 0  # every run's end-of-training pictures share one step, so that an image card shows them all


def image_key(prefix: str, name: str) -> str:
    """`progress/reconstructions` (step = epoch, from 0 before training) or `result/samples` (step FINAL_STEP)."""
    return prefix + name


class EpochImages:
    """Per epoch, with the epoch as step: inputs beside reconstructions, and samples from fixed noise; at step 0
    the untrained model, so that the UI's step slider, which starts at 0, never starts on an empty card."""

    def __init__(self, data: Splits, config: TrainConfig, log: MetricBuffer):
        self.variant, self.send = REGISTRY[config.model], log
        groups = 2 if self.variant.denoising else 4  # input/output rows, repeated: a square picture
        self.x, self.y = data.val_x[:IMAGE_ROWS * groups], data.val_y[:IMAGE_ROWS * groups]
        self.num_classes, self.seed = data.num_classes, config.seed
        self.epochs, self.logged = image_epochs(config.epochs), set()
        self.present: set[tuple[str, int]] = set()  # on --resume: what the run already has (`pictures.logged_pictures`)

    def on_epoch_end(self, epoch: int, model: torch.nn.Module, metrics: dict[str, float]) -> None:
        if epoch in self.epochs:
            self.log(epoch, model)
            model.train()

    @torch.no_grad()
    def log(self, epoch: int, model: torch.nn.Module) -> None:
        if epoch in self.logged:
            return
        model.eval()
        # The model's outputs are computed here; the pictures are composed and encoded in the logging thread.
        for key, drawing in self.drawings(model).items():
            if (image_key(EPOCH_IMAGES, key), epoch) not in self.present:  # a resumed run trains it again: not twice
                self.send.image(drawing, key=image_key(EPOCH_IMAGES, key), step=epoch)
        self.logged.add(epoch)

    def log_initial(self, config: TrainConfig, data: Splits, model: torch.nn.Module | None = None) -> None:
        """Step 0: the model as `fit` builds it before its first step (same seed, same initialisation), or `model`,
        the one `fit` is given."""
        if model is None:
            torch.manual_seed(config.seed)
            model = build(config, data)
            if config.decoder_bias == "mean":
                init_output_biases(model, data.train_x)
        self.log(0, model.to(self.x.device))

    def pictures(self, model) -> dict:
        return {key: drawing() for key, drawing in self.drawings(model).items()}

    @torch.no_grad()
    def drawings(self, model) -> dict[str, Callable[[], object]]:
        """The pictures' images computed now, each picture made by a call that another thread may make."""
        drawings = {}
        device = self.x.device
        if self.variant.denoising:
            noisy = model.corrupt(self.x, torch.Generator(device).manual_seed(self.seed))
            drawings["reconstructions"] = functools.partial(images.rows, noisy, model.reconstruct(noisy), self.x,
                                                            labels=images.DENOISING_ROWS)
        else:
            drawings["reconstructions"] = functools.partial(images.rows, self.x, model.reconstruct(self.x, self.y),
                                                            labels=images.RECONSTRUCTION_ROWS)
        if self.variant.generative:
            drawings["samples"] = images.sample_drawing(model, torch.Generator(device).manual_seed(self.seed),
                                                        conditional=self.variant.conditional, num_classes=self.num_classes)
        return drawings


@torch.no_grad()
def final_pictures(model, data: Splits, history: History, seed: int, max_points: int = 2000) -> dict:
    """Latent interpolation, latent space by label (2-D, or PCA and t-SNE) and loss curves."""
    model.eval()
    x, y = data.val_x[:max_points], data.val_y[:max_points]
    z = model.encode(x, y)
    pairs = min(IMAGE_ROWS, len(x) // 2)
    path = images.interpolate(z[:pairs], z[pairs:2 * pairs], IMAGE_ROWS)
    path_labels = y[:pairs].repeat_interleave(IMAGE_ROWS)
    pictures = {"interpolation": images.grid(model.decode(path, path_labels), IMAGE_ROWS,
                                             title="each row: one image's code to another's, in a straight line")}
    pictures.update(images.latent_plots(z.cpu().numpy(), y.cpu().numpy(), seed))
    if history.epochs:
        keys = ["train_epoch_loss"] + [k for k in history.epochs[0] if k.startswith("val_")]
        trained = history.config
        warmup = trained.kl_warmup if trained and "variational" in REGISTRY[trained.model].scopes else 0
        pictures["loss_curves"] = images.curves(history.epochs, keys, labels=[names.logged(k) for k in keys],
                                                warmup=min(warmup or 0, len(history.epochs)))
    return pictures


def log_dataset(data: Splits, data_dir: str | None) -> None:
    features = data.train_images.flatten(1).cpu().numpy()  # as stored (uint8 grey levels): no float copy
    with warnings.catch_warnings():  # a plain name is "ambiguous" to MLflow's source registry; it is only a label
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_numpy(features, targets=data.train_y.cpu().numpy(), name=data.name,
                                         source=str(data_dir or data.name))
    # Two runs logging the same data set at once (tuning workers) can race on the server's unique
    # (experiment, name, digest) row: the loser's retry finds the row and links to it.
    for attempt in range(3):
        try:
            mlflow.log_input(dataset, context="training")
            return
        except mlflow.exceptions.MlflowException:
            if attempt == 2:
                raise
            time.sleep(0.5 * (attempt + 1))


RANDOM_NAME = re.compile(r"^[a-z]+-[a-z]+-\d{1,4}$")  # MLflow's own run names: `angry-bug-231`


def pick_run_name(config: TrainConfig, options: TrackingOptions, experiment_id: str | None) -> str | None:
    """--run-name, else a name that says what the run is (`vae-normal-z8-digits`, `-2` where taken)."""
    if options.run_name or experiment_id is None:
        return options.run_name
    return describe.run_name(config, mlflow.MlflowClient(), experiment_id)


def rename_random_run(run, config: TrainConfig, options: TrackingOptions) -> None:
    """A run that `mlflow run` created keeps a name given with its --run-name; MLflow's random name is replaced."""
    if not options.run_name and RANDOM_NAME.match(run.info.run_name or ""):
        mlflow.set_tag(describe.RUN_NAME, describe.run_name(config, mlflow.MlflowClient(), run.info.experiment_id))


def describe_run(run_id: str, config: TrainConfig, data: Splits, history: History, registered: str | None,
                 version) -> None:
    """The run's description, and its model version's description and tags."""
    client = mlflow.MlflowClient()
    ranked_by = names.champion_metric(REGISTRY[config.model])
    kept = history.epochs[history.best_epoch - 1] if history.best_epoch >= 1 else {}
    text = describe.run_description(
        config, train_images=len(data.train_y), val_images=len(data.val_y), best_val_loss=history.best_val_loss,
        best_epoch=history.best_epoch, epochs_run=len(history.epochs), stopped_early=history.stopped_early,
        registered=None if version is None else f"models:/{registered}/{version}",
        ranked=(names.logged(ranked_by), kept[ranked_by]) if ranked_by in kept else None)
    client.set_tag(run_id, describe.NOTE, text)
    if version is not None:
        describe_version(client, registered, str(version), client.get_run(run_id), text)


def build(config: TrainConfig, data: Splits) -> torch.nn.Module:
    """The untrained network for `config` (`build_model`); a stacked variant loads the logged model it is built on
    (M1+M2's VAE) from its run."""
    return build_model(config, data.shape, data.num_classes, data=data, load=artifacts.load_model)


def train_tracked(config: TrainConfig, data: Splits, options: TrackingOptions, *, data_dir: str | None = None,
                  progress: bool = True, callbacks: tuple = (), parent_run_id: str | None = None,
                  tags: dict[str, str] | None = None, resume: dict | None = None,
                  reuse_run_id: str | None = None) -> RunResult:
    """One MLflow run around `fit`; `reuse_run_id`, the run created by `mlflow run` (its MLFLOW_RUN_ID, which the
    CLI reads), is reused, not duplicated.

    With `parent_run_id` the run is a child of that run, in its experiment (tuning: one child per trial);
    `callbacks` join the per-epoch image logging and may stop training by raising. With `resume` (a checkpoint,
    `open_checkpoint`) the checkpoint's run goes on where it stopped.

    How it ends: FINISHED, with the model logged before any picture (a picture that fails is a warning on the run);
    SIGINT/SIGTERM: KILLED, metrics flushed, checkpoint kept, RunStopped raised; a diverging loss: FAILED with the
    best model so far logged, RunDiverged raised; anything else: FAILED, re-raised."""
    variant = REGISTRY[config.model]
    given, config = config, config.resolve(len(data.train_y))
    # Built before any run is opened: a setting the variant refuses (hvae: --objective iwae-dreg), or a wrong M1 for
    # M1+M2, opens none. A stacked variant is built once, here (it loads the model it is built on); any other is
    # built again by `fit` from the same seed: the same weights, and the random stream as it always was.
    torch.manual_seed(config.seed)
    initial = build(config, data)
    if not variant.stacked:
        initial = None
    with lifecycle.stop_on_signals(say):
        if resume:
            run = mlflow.start_run(run_id=resume["run_id"])
        else:
            experiment_id = None
            if parent_run_id:
                experiment_id = mlflow.get_run(parent_run_id).info.experiment_id
            elif reuse_run_id is None:
                experiment_id = describe.open_experiment(mlflow.MlflowClient(), options.experiment)
                lifecycle.close_dead_runs(experiment_id, say)
            run = mlflow.start_run(run_id=reuse_run_id, run_name=pick_run_name(config, options, experiment_id),
                                   experiment_id=experiment_id, parent_run_id=parent_run_id, tags=tags)
        run_id = run.info.run_id
        folder = Path(options.checkpoint_dir) / run_id
        log = None
        try:
            if resume:
                recovery.send_unsent(run_id, folder, resume)
                resumed = mlflow.get_run(run_id).data.tags.get(tag.RESUMED, "")
                mlflow.set_tags({**lifecycle.owner_tags(), tag.RESUMED: ",".join(filter(None, [resumed, str(resume["epoch"])]))})
                with contextlib.suppress(mlflow.exceptions.MlflowException):
                    mlflow.MlflowClient().delete_tag(run_id, tag.END_REASON)  # it ended before; it has not ended now
                say(f"resuming run {run_id} after epoch {resume['epoch']} of {config.epochs}")
            else:
                rename_random_run(run, config, options)
                if not options.run_name and experiment_id is not None:  # runs started at once get distinct names
                    lifecycle.claim_run_name(mlflow.MlflowClient(), run,
                                             lambda: describe.run_name(config, mlflow.MlflowClient(), experiment_id))
                # The settings as given (`mlflow run` logs its entry point's parameters under the same names, and a
                # logged param cannot change); what `auto` resolved to goes in tags.
                mlflow.log_params(run_params(given))
                mlflow.set_tags({
                    tag.MODEL: config.model,
                    tag.MODEL_FAMILY: "variational" if variant.generative else "autoencoder",
                    tag.DATASET: config.dataset,
                    tag.VERSION: aetrack.__version__,
                    **({tag.GIT_COMMIT: commit} if (commit := git_commit()) else {}),
                    **resolved_tags(given, config),
                    **lifecycle.owner_tags(),
                })
                log_dataset(data, data_dir)
            log = MetricBuffer(run_id, skip=recovery.last_steps(run_id) if resume else None, echo=say,
                               journal=folder / recovery.JOURNAL)
            epoch_images = EpochImages(data, config, log)
            if resume:  # epochs after the checkpoint whose pictures were sent before a SIGKILL
                epoch_images.present = set(logged_pictures(mlflow.MlflowClient(), run_id))
            else:
                epoch_images.log_initial(config, data, initial)
            diverged = None
            try:
                model, history = fit(config, data, model=initial, log=log, callbacks=(epoch_images, *callbacks),
                                     checkpoint=folder / checkpoints.FILE, run_id=run_id, resume=resume, progress=progress)
            except Diverged as err:
                if err.history.best_epoch < 1:
                    raise
                diverged, model, history = err, err.model, err.history
            result = _finish(run, model, history, config, data, options, log, epoch_images)
            if diverged is not None:
                raise RunDiverged(f"{diverged}; run {run_id} is FAILED, with the model of its best epoch "
                                  f"({history.best_epoch}) logged")
            persist(lambda: mlflow.end_run("FINISHED"), "the run's end")
        except Interrupted as stop:
            with lifecycle.closing(say):
                recovery.close_stopped(run_id, folder, log, stop)
                saved = recovery.saved_epoch(folder, run_id)
            raise RunStopped(run_id, stop.signum, saved, config.epochs, "KILLED") from None
        except BaseException as err:
            with lifecycle.closing(say):
                recovery.close_failed(run_id, log, err)
            raise
        shutil.rmtree(folder, ignore_errors=True)  # a finished run has no use for its checkpoint
        with contextlib.suppress(OSError):
            folder.parent.rmdir()  # only when no other run's checkpoint is left there
    return result


def _finish(run, model, history: History, config: TrainConfig, data: Splits, options: TrackingOptions,
            log: MetricBuffer, epoch_images: EpochImages) -> RunResult:
    """After training: the model first (it is what counts), then the pictures, each of which may fail alone."""
    run_id = run.info.run_id
    variant = REGISTRY[config.model]
    warnings_seen: list[str] = []

    def attempt(what: str, call):
        try:
            return call()
        except Interrupted:
            raise
        except Exception as err:  # noqa: BLE001 - a picture that fails must not lose the run
            message = f"{what} failed: {type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
            warnings_seen.append(message)
            say(f"warning: {message}")

    log.flush()  # every metric of training is on the server before anything else
    extra, sampler = {}, None
    if not variant.generative:
        # Ex-post density estimation: the autoencoder generates from a mixture fitted to its codes.
        sampler = attempt("fitting the latent sampler", lambda: samplers.fit_sampler(model, data.train_x, seed=config.seed))
        extra = sampler.state() if sampler is not None else {}
    info = modelio.ModelInfo(config, data.shape, data.classes)
    name = None
    if options.register and (variant.generative or options.registered_model):
        name = options.registered_model or registered_name(config)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="aetrack-pictures") as drawing:
        # The end-of-run pictures (t-SNE, matplotlib) are drawn beside the model's writing and sending, which mostly
        # waits on files and the server; they are logged after it, as before.
        drawn = drawing.submit(final_pictures, model, data, history, config.seed)
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = modelio.save(model, info, Path(tmp) / "aetrack-model", extra)
            logged = persist(lambda: log_generator(model_dir, registered_model_name=name), "the model")

        def pictures():
            latent = drawn.result()
            epoch_images.log(history.best_epoch, model)  # the weights kept: the best epoch's
            for key, picture in {**epoch_images.pictures(model), **latent}.items():
                log.image(picture, key=image_key(FINAL_IMAGES, key), step=FINAL_STEP)

        attempt("the end-of-training pictures", pictures)
    if sampler is not None:
        attempt("the sample grid", lambda: log.image(
            images.sample_grid(model, torch.Generator().manual_seed(config.seed), conditional=False,
                               num_classes=data.num_classes, sampler=sampler),
            key=image_key(FINAL_IMAGES, "samples"), step=FINAL_STEP))
    log({names.BEST_VAL_LOSS: history.best_val_loss, names.BEST_EPOCH: history.best_epoch}, FINAL_STEP)
    log.flush()
    end_tags = {tag.STOPPED_EARLY: str(history.stopped_early).lower()}
    if warnings_seen:
        end_tags[tag.WARNINGS] = " | ".join(warnings_seen)[:5000]
    persist(lambda: mlflow.set_tags(end_tags), "the run's tags")
    version = getattr(logged, "registered_model_version", None)  # absent when nothing was registered
    attempt("the run's description", lambda: describe_run(run_id, config, data, history, name, version))
    crowning = None
    if version is not None:
        crowning = attempt("crowning the champion", lambda: registry.crown(
            mlflow.MlflowClient(), name, names.champion_metric(variant), candidate=str(version)))
    return RunResult(run_id, run.info.experiment_id, mlflow.get_tracking_uri(), f"runs:/{run_id}/{config.model}",
                     name, None if version is None else str(version), history, logged.model_uri, crowning)
