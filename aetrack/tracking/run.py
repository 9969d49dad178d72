"""MLflow around the training loop: params, tags, data set, metrics (asynchronous),
images with steps, the logged pyfunc model and its registry version.

The tracking URI is the caller's to set (the CLI does, once); this module only uses it."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import torch
from mlflow.entities import Metric
from tqdm.auto import tqdm

import aetrack
from aetrack import checkpoints, images, modelio, samplers
from aetrack.config import TrackingOptions, TrainConfig, UserError  # noqa: F401 (TrackingOptions: re-exported)
from aetrack.data import Splits
from aetrack.images import IMAGE_ROWS
from aetrack.models import REGISTRY, build_model
from aetrack.tracking import describe, lifecycle
from aetrack.tracking import metric_names as names
from aetrack.tracking import tags as tag
from aetrack.tracking.artifacts import log_generator
from aetrack.tracking.lifecycle import Interrupted, MetricBuffer  # noqa: F401 (MetricBuffer: re-exported)
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


def registered_name(config: TrainConfig) -> str:
    return f"aetrack-{config.dataset}-{config.model}"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(aetrack.__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


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

    def on_epoch_end(self, epoch: int, model: torch.nn.Module, metrics: dict[str, float]) -> None:
        if epoch in self.epochs:
            self.log(epoch, model)
            model.train()

    @torch.no_grad()
    def log(self, epoch: int, model: torch.nn.Module) -> None:
        if epoch in self.logged:
            return
        model.eval()
        for key, picture in self.pictures(model).items():
            self.send.image(picture, key=image_key(EPOCH_IMAGES, key), step=epoch)
        self.logged.add(epoch)

    def log_initial(self, config: TrainConfig, data: Splits) -> None:
        """Step 0: the model as `fit` builds it before its first step (same seed, same initialisation)."""
        torch.manual_seed(config.seed)
        model = build_model(config, data.shape, data.num_classes)
        if config.decoder_bias == "mean":
            init_output_biases(model, data.train_x)
        self.log(0, model.to(self.x.device))

    def pictures(self, model) -> dict:
        pictures = {}
        device = self.x.device
        if self.variant.denoising:
            noisy = model.corrupt(self.x, torch.Generator(device).manual_seed(self.seed))
            pictures["reconstructions"] = images.rows(noisy, model.reconstruct(noisy), self.x, labels=images.DENOISING_ROWS)
        else:
            pictures["reconstructions"] = images.rows(self.x, model.reconstruct(self.x, self.y),
                                                      labels=images.RECONSTRUCTION_ROWS)
        if self.variant.generative:
            pictures["samples"] = images.sample_grid(model, torch.Generator(device).manual_seed(self.seed),
                                                     conditional=self.variant.conditional, num_classes=self.num_classes)
        return pictures


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
        pictures["loss_curves"] = images.curves(history.epochs, keys, labels=[names.logged(k) for k in keys])
    return pictures


def log_dataset(data: Splits, data_dir: str | None) -> None:
    features = data.train_x.flatten(1).cpu().numpy()
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


def applies(config: TrainConfig, name: str) -> bool:
    """Whether setting `name` applies to `config.model` (an option of no group, or of one of its groups)."""
    scope = TrainConfig.__dataclass_fields__[name].metadata["scope"]
    return scope is None or scope in REGISTRY[config.model].scopes


def run_params(given: TrainConfig, resolved: TrainConfig) -> dict[str, str]:
    """The params a run logs: the settings that apply to its variant, as given, and what each `auto` resolved to
    (`resolved_epochs` beside `epochs` = `auto`). `TrainConfig.from_params` fills the others from their defaults,
    which is what the variant ignored."""
    params = {k: v for k, v in given.to_params().items() if applies(given, k)}
    params.update({f"resolved_{name}": str(getattr(resolved, name)) for name in ("epochs", "patience", "kl_warmup")
                   if applies(given, name) and getattr(given, name) is None})
    return params


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
    text = describe.run_description(
        config, train_images=len(data.train_x), val_images=len(data.val_x), best_val_loss=history.best_val_loss,
        best_epoch=history.best_epoch, epochs_run=len(history.epochs), stopped_early=history.stopped_early,
        registered=None if version is None else f"models:/{registered}/{version}")
    client.set_tag(run_id, describe.NOTE, text)
    if version is not None:
        describe_version(client, registered, str(version), client.get_run(run_id), text)


class RunStopped(KeyboardInterrupt):
    """A signal stopped the run; it is closed as KILLED with its checkpoint kept. `epoch` is the last saved one.
    A KeyboardInterrupt, so that it stops whatever loop called training (an Optuna study does not go on)."""

    def __init__(self, run_id: str, signum: int, epoch: int, epochs: int, status: str):
        self.run_id, self.signum, self.epoch, self.epochs, self.status = run_id, signum, epoch, epochs, status
        super().__init__(f"run {run_id} stopped by {signal.Signals(signum).name} after epoch {epoch} of {epochs} ({status})")


class RunDiverged(UserError):
    """The training loss stopped being finite; the run is FAILED, with the best model before that logged."""


def say(message: str) -> None:
    """A line on stderr that does not tear the progress bar."""
    tqdm.write(message, file=sys.stderr)


def open_checkpoint(run_id: str, checkpoint_dir: str) -> dict:
    """The checkpoint to resume `run_id` from: the local one (`<checkpoint_dir>/<run id>/last.pt`), else the copy a
    stopped run left among its artifacts. A finished run, or one whose process still runs, cannot be resumed."""
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise UserError(f"--resume {run_id}: no such run at {mlflow.get_tracking_uri()}") from None
    status = run.info.status
    if status == "FINISHED":
        raise UserError(f"--resume {run_id}: the run finished; there is nothing to resume")
    if status == "RUNNING" and lifecycle.owner_alive(run.data.tags):
        raise UserError(f"--resume {run_id}: the run is still running (process {run.data.tags[tag.PID]})")
    local = checkpoints.path_for(checkpoint_dir, run_id)
    if local.is_file():
        return checkpoints.load(local, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            copy = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT, dst_path=tmp)
        except Exception:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
            raise checkpoints.CheckpointError(f"--resume {run_id}: no checkpoint at {local}, and none among the run's "
                                              "artifacts") from None
        return checkpoints.load(Path(copy), run_id)


CHECKPOINT_ARTIFACT = f"checkpoint/{checkpoints.FILE}"  # where a stopped run leaves its checkpoint for other machines
UNSENT = "unsent-metrics.json"  # beside the local checkpoint: metrics a stopped run could not deliver


def persist(call, what: str):
    """`call()` until it goes through: the server may be away for a while, and this must arrive."""
    delay, warned = 1.0, False
    while True:
        try:
            return call()
        except Interrupted:
            raise
        except Exception as err:  # noqa: BLE001
            if isinstance(err, mlflow.exceptions.MlflowException) and not _unavailable(err):
                raise
            if not warned:
                say(f"warning: the tracking server {mlflow.get_tracking_uri()} does not answer ({type(err).__name__}); "
                    f"waiting to send {what}")
                warned = True
            time.sleep(delay)
            delay = min(2 * delay, 10.0)


def _unavailable(err: Exception) -> bool:
    """An MlflowException that means the server was not there (as opposed to one that refused the request)."""
    text = str(err)
    return any(mark in text for mark in ("Max retries exceeded", "Connection", "ConnectTimeout", "ReadTimeout",
                                          "503", "502", "504"))


def _send_unsent(run_id: str, folder: Path) -> None:
    file = folder / UNSENT
    if not file.is_file():
        return
    metrics = [Metric(key, value, timestamp, step) for key, value, timestamp, step in json.loads(file.read_text())]
    client = mlflow.MlflowClient()
    for start in range(0, len(metrics), 900):
        persist(lambda: client.log_batch(run_id, metrics=metrics[start:start + 900]), "the metrics of the stopped run")
    file.unlink()


def _last_steps(run_id: str) -> dict[str, int]:
    """Each metric's last logged step: a resumed run does not log those steps again."""
    return {metric.key: metric.step for metric in mlflow.MlflowClient().get_run(run_id).data._metric_objs}


def train_tracked(config: TrainConfig, data: Splits, options: TrackingOptions, *, data_dir: str | None = None,
                  progress: bool = True, callbacks: tuple = (), parent_run_id: str | None = None,
                  tags: dict[str, str] | None = None, resume: dict | None = None) -> RunResult:
    """One MLflow run around `fit`; the run created by `mlflow run` (MLFLOW_RUN_ID) is reused, not duplicated.

    With `parent_run_id` the run is a child of that run, in its experiment (tuning: one child per trial);
    `callbacks` join the per-epoch image logging and may stop training by raising. With `resume` (a checkpoint,
    `open_checkpoint`) the checkpoint's run goes on where it stopped.

    How it ends: FINISHED, with the model logged before any picture (a picture that fails is a warning on the run);
    SIGINT/SIGTERM: KILLED, metrics flushed, checkpoint kept, RunStopped raised; a diverging loss: FAILED with the
    best model so far logged, RunDiverged raised; anything else: FAILED, re-raised."""
    variant = REGISTRY[config.model]
    given, config = config, config.resolve(len(data.train_x))
    with lifecycle.stop_on_signals(say):
        if resume:
            run = mlflow.start_run(run_id=resume["run_id"])
        else:
            experiment_id = None
            if parent_run_id:
                experiment_id = mlflow.get_run(parent_run_id).info.experiment_id
            elif "MLFLOW_RUN_ID" not in os.environ:
                experiment_id = mlflow.set_experiment(options.experiment).experiment_id
                describe.describe_experiment(mlflow.MlflowClient(), experiment_id)
                lifecycle.close_dead_runs(experiment_id, say)
            run = mlflow.start_run(run_name=pick_run_name(config, options, experiment_id), experiment_id=experiment_id,
                                   parent_run_id=parent_run_id, tags=tags)
        run_id = run.info.run_id
        folder = Path(options.checkpoint_dir) / run_id
        log = None
        try:
            if resume:
                _send_unsent(run_id, folder)
                resumed = mlflow.get_run(run_id).data.tags.get(tag.RESUMED, "")
                mlflow.set_tags({**lifecycle.owner_tags(), tag.RESUMED: ",".join(filter(None, [resumed, str(resume["epoch"])]))})
                with contextlib.suppress(mlflow.exceptions.MlflowException):
                    mlflow.MlflowClient().delete_tag(run_id, tag.END_REASON)  # it ended before; it has not ended now
                say(f"resuming run {run_id} after epoch {resume['epoch']} of {config.epochs}")
            else:
                rename_random_run(run, config, options)
                # The settings as given (`mlflow run` logs its entry point's parameters under the same names, and a
                # logged param cannot change), and what `auto` resolved to beside them.
                mlflow.log_params(run_params(given, config))
                mlflow.set_tags({
                    tag.MODEL: config.model,
                    tag.MODEL_FAMILY: "variational" if variant.generative else "autoencoder",
                    tag.DATASET: config.dataset,
                    tag.VERSION: aetrack.__version__,
                    **({tag.GIT_COMMIT: commit} if (commit := git_commit()) else {}),
                    **lifecycle.owner_tags(),
                })
                log_dataset(data, data_dir)
            log = MetricBuffer(run_id, skip=_last_steps(run_id) if resume else None, echo=say)
            epoch_images = EpochImages(data, config, log)
            if not resume:
                epoch_images.log_initial(config, data)
            diverged = None
            try:
                model, history = fit(config, data, log=log, callbacks=(epoch_images, *callbacks),
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
            with lifecycle.signals_deferred():
                _close_stopped(run_id, folder, log, stop)
                saved = _saved_epoch(folder, run_id)
            raise RunStopped(run_id, stop.signum, saved, config.epochs, "KILLED") from None
        except BaseException as err:
            with lifecycle.signals_deferred():
                _close_failed(run_id, log, err)
            raise
        shutil.rmtree(folder, ignore_errors=True)  # a finished run has no use for its checkpoint
        with contextlib.suppress(OSError):
            folder.parent.rmdir()  # only when no other run's checkpoint is left there
    return result


def _close_failed(run_id: str, log: MetricBuffer | None, err: BaseException) -> None:
    """FAILED, with why, after what was logged has been sent (bounded in time: the server may be the failure)."""
    try:
        if log is not None and not log.flush(timeout=30):
            say(f"warning: {len(log.unsent())} metrics of run {run_id} could not reach the tracking server")
        reason = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
        mlflow.set_tag(tag.END_REASON, reason[:5000])
        mlflow.end_run("FAILED")
    except Exception as close_err:  # noqa: BLE001 - the run stays RUNNING; a later aetrack command closes it
        say(f"warning: could not close run {run_id} on the tracking server ({type(close_err).__name__})")


def _saved_epoch(folder: Path, run_id: str) -> int:
    try:
        return int(checkpoints.load(folder / checkpoints.FILE, run_id)["epoch"])
    except checkpoints.CheckpointError:
        return 0


def _close_stopped(run_id: str, folder: Path, log: MetricBuffer | None, stop: Interrupted) -> None:
    """Flush what was logged, keep the unsent part beside the checkpoint, leave a copy of the checkpoint with the
    run (another machine can resume it), mark the run KILLED. Bounded in time: `docker stop` waits 10 s."""
    delivered = log is None or log.flush(timeout=5)
    if not delivered:
        folder.mkdir(parents=True, exist_ok=True)
        unsent = [[m.key, m.value, m.timestamp, m.step] for m in log.unsent()]
        (folder / UNSENT).write_text(json.dumps(unsent))
        say(f"{len(unsent)} metrics could not reach the tracking server; they are kept in {folder / UNSENT} "
            "and sent on --resume")
        return  # the server is away: the run stays RUNNING, and a later aetrack command closes it
    client = mlflow.MlflowClient()
    try:
        if (folder / checkpoints.FILE).is_file():
            client.log_artifact(run_id, str(folder / checkpoints.FILE), artifact_path=CHECKPOINT_ARTIFACT.rsplit("/", 1)[0])
        client.set_tag(run_id, tag.END_REASON, f"stopped by {signal.Signals(stop.signum).name}")
        mlflow.end_run("KILLED")
    except Exception as err:  # noqa: BLE001 - closing is best effort; the local checkpoint is what counts
        say(f"warning: could not close run {run_id} on the tracking server ({type(err).__name__})")


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
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = modelio.save(model, info, Path(tmp) / "aetrack-model", extra)
        logged = persist(lambda: log_generator(model_dir, registered_model_name=name), "the model")

    def pictures():
        epoch_images.log(history.best_epoch, model)  # the weights kept: the best epoch's
        for key, picture in {**epoch_images.pictures(model), **final_pictures(model, data, history, config.seed)}.items():
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
    return RunResult(run_id, run.info.experiment_id, mlflow.get_tracking_uri(), f"runs:/{run_id}/{config.model}",
                     name, None if version is None else str(version), history, logged.model_uri)
