"""The MLflow pyfunc model that serves a trained aetrack model with `mlflow models serve`.

A request is a table, one row per item; each row asks for exactly one thing:

    n       draw n images (from the prior; a plain autoencoder from its fitted latent mixture)
    latent  decode this latent vector (latent_dim numbers)
    image   reconstruct this image: a base64 PNG of the model's size (a dae denoises it)
    pixels  reconstruct this image: C*H*W numbers in [0, 1], flat or nested [C][H][W]
    label   optional, for cvae and m2: the class to generate, decode or reconstruct with

Params: `seed` (the same seed gives the same bytes; none draws a fresh one), `temperature`
(scales the prior noise; 0 to MAX_TEMPERATURE) and `output` ("png": base64 PNG images, or "array": pixel lists).
The answer has one row per image: `row` (the request row), `label` (the class used, cvae and m2)
and `image` or `pixels`.

Every bad request is a `ServingError`: HTTP 400 with one line that names the field. Loading the
model inside `mlflow models serve` also puts `aetrack.serving.guard` in front of MLflow's scoring app
(body limit, one-line 4xx for what MLflow itself cannot read). The model is logged as "models from
code" (aetrack/serving/pyfunc_model.py, by aetrack.tracking.artifacts) with the package in code_paths;
loading it imports code and reads JSON and a weights-only state dict, never unpickling arbitrary objects.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import math
import struct
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.types.schema import AnyType, Array, ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image

from aetrack import modelio
from aetrack.models import REGISTRY
from aetrack.samplers import LatentMixture, generate
from aetrack.serving import guard
from aetrack.serving.guard import shown

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")  # the entry file MLflow runs to load the model
MAX_IMAGES = 1024            # images per request, all rows together
MAX_IMAGE_BYTES = 1 << 20    # one base64 PNG
# The prior noise's scale, at most: far past any useful draw (a code 100 standard deviations out), and small enough
# that the noise, the code and the decoder's output stay finite in float32 (1e39 overflowed to NaN pixels).
MAX_TEMPERATURE = 100.0
REQUESTS = ("n", "latent", "image", "pixels")
FIELDS = REQUESTS + ("label",)
OUTPUTS = ("png", "array")

logger = logging.getLogger(__name__)

# The fields are named but untyped: MLflow enforces a typed schema before predict runs, and then an
# optional integer column fails on rows that lack it (pandas makes the gap NaN), n=1.5 becomes 1, and
# a wrong type gets a multi-line message quoting the input. `GeneratorModel.check` does the typing.
# MLflow drops columns the schema does not name (with a warning in the server's log).
INPUT_SCHEMA = Schema([ColSpec(AnyType(), name, required=False) for name in FIELDS])
PARAMS = ParamSchema([
    ParamSpec("seed", "long", None),
    ParamSpec("temperature", "double", 1.0),
    ParamSpec("output", "string", "png"),
])
OUTPUT_SCHEMA = Schema([
    ColSpec("long", "row"),
    ColSpec("long", "label", required=False),
    ColSpec("string", "image", required=False),
    ColSpec(Array("double"), "pixels", required=False),
])
SIGNATURE = ModelSignature(inputs=INPUT_SCHEMA, outputs=OUTPUT_SCHEMA, params=PARAMS)


class ServingError(MlflowException):
    """A failure the client reads as one line: no echo of the input, no stack trace.

    MLflow's scoring server rewrites the message of an MlflowException raised in predict to
    "Failed to predict data '<the whole input>'. \\nError: <message>"; this message is fixed
    when the error is made, so that rewrite does not take.
    """

    def __init__(self, message: str, error_code: int = INVALID_PARAMETER_VALUE):
        super().__init__(message, error_code=error_code)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        self.__dict__.setdefault("_message", value)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_LEVEL = 6  # zlib's default, as PIL's: on 8x8 and 28x28 images level 1 saves no time worth the bytes


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


PNG_END = png_chunk(b"IEND", b"")


def encode_pngs(images: torch.Tensor) -> list[str]:
    """(N, C, H, W) in [0, 1] -> one base64 PNG per image: 8-bit grey for one channel, RGB for three.

    Written directly (signature, IHDR, one IDAT of filter-0 scanlines, IEND; PNG spec, sections 5 and 11) from
    one uint8 array for the whole batch: PIL's per-image set-up cost four times the compression itself.
    """
    count, channels, height, width = images.shape
    # Rounded and cast by numpy (half to even, as torch.round): torch's round and uint8 cast of a small tensor cost
    # 0.1-0.8 ms each on a busy two-core machine (thread-pool hand-offs), numpy's a few microseconds.
    scaled = (images.detach().clamp(0, 1) * 255).permute(0, 2, 3, 1).cpu().numpy()
    pixels = np.rint(scaled).astype(np.uint8)
    scanlines = np.zeros((count, height, 1 + width * channels), dtype=np.uint8)  # a 0 byte starts each line: no filter
    scanlines[:, :, 1:] = pixels.reshape(count, height, width * channels)
    head = PNG_SIGNATURE + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0 if channels == 1 else 2, 0, 0, 0))
    return [base64.b64encode(head + png_chunk(b"IDAT", zlib.compress(lines.tobytes(), PNG_LEVEL)) + PNG_END).decode("ascii")
            for lines in scanlines]


def encode_png(image: torch.Tensor) -> str:
    """(C, H, W) in [0, 1] -> base64 PNG ('L' for one channel, 'RGB' for three)."""
    return encode_pngs(image.unsqueeze(0))[0]


def decode_png(text: str) -> np.ndarray:
    """base64 PNG -> uint8 array, (H, W) or (H, W, C): how a client reads an answer's image."""
    return np.array(Image.open(io.BytesIO(base64.b64decode(text))))


# ----- reading a request -----------------------------------------------------------------------

def request_rows(frame: pd.DataFrame) -> list[dict]:
    """The request's rows as dicts; MLflow has made every request format a DataFrame of the signature's columns."""
    if frame.empty:
        raise ServingError(f"input: no row has any of the fields {', '.join(FIELDS)} "
                           "(fields the signature does not name are dropped)")
    names = list(frame.columns)
    return [dict(zip(names, values)) for values in frame.to_numpy(dtype=object).tolist()]  # 5x faster than to_dict


def plain(value):
    """numpy scalars and 0-d arrays -> Python values; None and NaN -> None (an absent cell)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def whole_number(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ServingError(f"{field}: expected a whole number, got {type(value).__name__}")
    if isinstance(value, float) and not value.is_integer():
        raise ServingError(f"{field}: expected a whole number, got {shown(value)}")
    return int(value)


def numbers(value, field: str) -> np.ndarray:
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise ServingError(f"{field}: expected a list of numbers, got {type(value).__name__}")
    try:
        array = np.asarray(value.tolist() if isinstance(value, np.ndarray) else value, dtype=np.float32)
    except (TypeError, ValueError):  # ragged, not numbers, or nested past numpy's 64 dimensions
        raise ServingError(f"{field}: expected a list of numbers (of equal lengths when nested)") from None
    except OverflowError:  # an integer beyond any float
        raise ServingError(f"{field}: a number is too large") from None
    if not np.isfinite(array).all():
        raise ServingError(f"{field}: NaN or infinity")
    return array


class Request:
    """One checked request row: what to do (`kind`), with what, and how many images it makes."""

    def __init__(self, kind: str, value, label: int | None):
        self.kind, self.value, self.label = kind, value, label

    @property
    def count(self) -> int:
        return self.value if self.kind == "n" else 1


class GeneratorModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        guard.install(max_rows=MAX_IMAGES)  # inside `mlflow models serve` only; each row makes an image
        self.model, self.info, extra = modelio.load(context.artifacts["model"])
        self.sampler = LatentMixture.from_state(extra)
        self.variant = REGISTRY[self.info.config.model]
        self.conditional = self.variant.conditional
        self.shape = tuple(self.info.shape)
        self.latent_dim = self.info.config.latent_dim
        with torch.inference_mode():  # warm-up: the first request is not slower than the rest
            self.images(Request("n", 1, None), torch.Generator().manual_seed(0), 1.0)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """Request rows in, one row per image out (see the module's docstring)."""
        try:
            rows = [self.check(i, row) for i, row in enumerate(request_rows(model_input))]
            seed, temperature, output = self.check_params(params or {})
            total = sum(request.count for request in rows)
            if total > MAX_IMAGES:
                raise ServingError(f"n: at most {MAX_IMAGES} images per request, asked for {total}")
            generator = torch.Generator().manual_seed(seed)
            column = "image" if output == "png" else "pixels"
            records = []
            with torch.inference_mode():
                for i, request in enumerate(rows):
                    images, labels = self.images(request, generator, temperature)
                    values = encode_pngs(images) if output == "png" else images.flatten(1).tolist()
                    if labels is None:
                        records += [(i, value) for value in values]
                    else:
                        records += [(i, label, value) for label, value in zip(labels.tolist(), values)]
            names = ["row", "label", column] if self.conditional else ["row", column]
            # Object columns and index: pandas' arrow-backed strings cost more to build and serialise
            # than drawing the image does.
            return pd.DataFrame(records, columns=pd.Index(names, dtype=object), dtype=object)
        except ServingError:
            raise
        except Exception as err:  # noqa: BLE001 - a bug must not send a stack trace to the client
            logger.exception("aetrack prediction failed")
            raise ServingError(f"internal error: {type(err).__name__}", error_code=INTERNAL_ERROR) from None

    # ----- checks: every message names the field -----

    def check(self, i: int, row: dict) -> Request:
        values = {name: plain(value) for name, value in row.items()}
        given = [name for name in REQUESTS if values.get(name) is not None]
        if len(given) != 1:
            found = f"got {', '.join(given)}" if given else "got none"
            raise ServingError(f"row {i}: give exactly one of the fields n, latent, image, pixels ({found})")
        kind = given[0]
        value = values[kind]
        try:
            if kind == "n":
                value = whole_number(value, "n")
                if not 1 <= value <= MAX_IMAGES:
                    raise ServingError(f"n: must be between 1 and {MAX_IMAGES}, got {shown(value)}")
            elif kind == "latent":
                value = numbers(value, "latent")
                if value.shape != (self.latent_dim,):
                    raise ServingError(f"latent: expected {self.latent_dim} numbers, got shape {shown(list(value.shape))}")
            elif kind == "image":
                value = self.read_png(value)
            else:
                value = self.read_pixels(value)
            label = self.check_label(values.get("label"), kind)
        except ServingError as err:
            raise ServingError(f"row {i}: {err.message}") from None
        return Request(kind, value, label)

    def check_label(self, label, kind: str) -> int | None:
        if label is None:
            if kind in ("image", "pixels") and self.conditional and not self.variant.classifies:
                raise ServingError(f"label: a {self.info.config.model} model needs the label of the image it reconstructs")
            return None
        if not self.conditional:
            raise ServingError(f"label: this {self.info.config.model} model is not conditional; leave label out")
        label = whole_number(label, "label")
        if not 0 <= label < self.info.num_classes:
            raise ServingError(f"label: must be between 0 and {self.info.num_classes - 1}, got {shown(label)}")
        return label

    def read_png(self, text) -> torch.Tensor:
        channels, height, width = self.shape
        if not isinstance(text, str):
            raise ServingError(f"image: expected a base64 PNG string, got {type(text).__name__}")
        if len(text) > MAX_IMAGE_BYTES:
            raise ServingError(f"image: larger than {MAX_IMAGE_BYTES} bytes")
        try:
            pil = Image.open(io.BytesIO(base64.b64decode(text, validate=True)), formats=["PNG"])
        except Image.DecompressionBombError:  # a header declaring over 2 * Image.MAX_IMAGE_PIXELS pixels
            raise ServingError(f"image: expected {width}x{height} pixels, got a PNG that declares far more") from None
        except (binascii.Error, ValueError, OSError):
            raise ServingError("image: not a base64-encoded PNG") from None
        if pil.size != (width, height):  # read from the header, before any pixel is decoded
            raise ServingError(f"image: expected {width}x{height} pixels, got {pil.size[0]}x{pil.size[1]}")
        try:
            array = np.asarray(pil.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255
        except Exception as err:  # noqa: BLE001 - whatever the decoder trips on in the client's bytes is a bad PNG
            raise ServingError(f"image: cannot decode the PNG ({type(err).__name__}: {shown(str(err), 80)})") from None
        return torch.from_numpy(array.reshape(height, width, channels).transpose(2, 0, 1).copy())

    def read_pixels(self, value) -> torch.Tensor:
        channels, height, width = self.shape
        array = numbers(value, "pixels")
        allowed = {(channels * height * width,), (channels, height, width)} | ({(height, width)} if channels == 1 else set())
        if array.shape not in allowed:
            raise ServingError(f"pixels: expected {channels * height * width} numbers ({channels}x{height}x{width}, "
                               f"flat or nested), got shape {shown(list(array.shape))}")
        if array.min() < 0 or array.max() > 1:
            raise ServingError("pixels: values must lie in [0, 1]")
        return torch.from_numpy(array.reshape(self.shape))

    @staticmethod
    def check_params(params: dict) -> tuple[int, float, str]:
        seed, temperature, output = params.get("seed"), params.get("temperature", 1.0), params.get("output", "png")
        if seed is None:
            seed = int(torch.randint(2**62, (1,)))
        elif not 0 <= seed < 2**63:
            raise ServingError(f"seed: must be between 0 and 2**63 - 1, got {shown(seed)}")
        if temperature is None or not (math.isfinite(temperature) and 0 <= temperature <= MAX_TEMPERATURE):
            raise ServingError(f"temperature: must be a number from 0 to {MAX_TEMPERATURE:g}, got {shown(temperature)}")
        if output not in OUTPUTS:
            raise ServingError(f"output: must be one of {', '.join(OUTPUTS)}, got {shown(output)}")
        return int(seed), float(temperature), output

    # ----- the work -----

    def images(self, request: Request, generator: torch.Generator, temperature: float):
        """(images (N, C, H, W), labels (N,) or None) for one request row."""
        given = None if request.label is None else torch.full((request.count,), request.label)
        if request.kind in ("image", "pixels"):
            x = request.value.unsqueeze(0)
            if given is None and self.variant.classifies:  # a conditional model reads the class with its classifier
                given = self.model.classify(x)
            return self.model.reconstruct(x, given), given
        labels = given
        if labels is None and self.conditional:
            labels = torch.randint(self.info.num_classes, (request.count,), generator=generator)
        if request.kind == "latent":
            return self.model.decode(torch.from_numpy(request.value).unsqueeze(0), labels), labels
        return generate(self.model, request.value, labels, generator, temperature, self.sampler), labels


# ----- what the logged model declares -----------------------------------------------------------

def input_example(info: modelio.ModelInfo) -> list[dict]:
    """One row of each kind, valid for this model: what the MLflow UI shows as the way to call it."""
    channels, height, width = info.shape
    blank = torch.full((channels, height, width), 0.5)
    conditional = REGISTRY[info.config.model].conditional
    rows = [{"n": 2}, {"latent": [0.0] * info.config.latent_dim}, {"image": encode_png(blank)}]
    return [{**row, "label": 0} for row in rows] if conditional else rows


def metadata(info: modelio.ModelInfo) -> dict:
    config = info.config
    return {"aetrack": {"model": config.model, "dataset": config.dataset, "shape": list(info.shape),
                        "latent_dim": config.latent_dim, "classes": list(info.classes), "max_images": MAX_IMAGES}}


def requirements() -> list[str]:
    """The serving environment: these packages at the versions installed here.

    Where only mlflow-skinny is installed, `mlflow` is pinned to its version (the two are released together); a
    package that is not installed here is left out rather than failing the model's logging after training.
    """
    import importlib.metadata as md

    pins = []
    for name in ["torch", "torchvision", "mlflow", "pandas", "numpy", "pillow", "scikit-learn"]:
        for dist in [name, "mlflow-skinny"] if name == "mlflow" else [name]:
            try:
                pins.append(f"{name}=={md.version(dist)}")
                break
            except md.PackageNotFoundError:
                continue
    return pins
