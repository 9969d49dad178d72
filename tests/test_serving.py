"""A registered generator served by a real `mlflow models serve` process on loopback.

One cvae, trained on `digits` just enough that a classifier can tell its labels apart, is
registered in a temporary SQLite store, aliased `champion` and served once for the module.
Every variant's pyfunc model is also loaded in-process and asked for every kind of request.
Bad requests, from aetrack's checks or from MLflow's layer in front of them, get a one-line 4xx;
a 200 MB body is refused without the server's memory growing (tests/test_serving_fuzz.py fuzzes).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import tempfile
import time
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import torch
from mlflow import MlflowClient
from mlflow.models.utils import load_serving_example
from PIL import Image

from aetrack import data as datasets
from aetrack import modelio, samplers
from aetrack.serving import generator as serving
from aetrack.serving.generator import decode_png, encode_png, encode_pngs
from aetrack.serving import guard as serving_guard
from aetrack.tracking import artifacts
from aetrack.config import TrainConfig
from aetrack.models import REGISTRY, build_model
from aetrack.training import fit
from conftest import STAND_IN_M1, VENV_BIN, free_port, stand_in_m1, wait_http

NAME = "aetrack-digits-cvae"
# Enough for a cvae on digits to draw recognisable digits of each label (about 2 s on one core).
LABEL_CONFIG = TrainConfig(model="cvae", epochs=4, batch_size=32, lr=3e-3, seed=0)


# ----- helpers, also used by benchmarks/serving.py ----------------------------------------------

@contextlib.contextmanager
def tracking(uri: str):
    """Point MLflow at `uri` for a while; after, MLflow follows $MLFLOW_TRACKING_URI again."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        if previous is not None:
            os.environ["MLFLOW_TRACKING_URI"] = previous


def new_store(root: Path) -> str:
    """A SQLite tracking store in `root` whose experiment keeps its artifacts in `root` too."""
    uri = f"sqlite:///{root}/mlflow.db"
    MlflowClient(uri).create_experiment("aetrack", artifact_location=(root / "artifacts").as_uri())
    return uri


def log_and_register(model, info: modelio.ModelInfo, name: str | None, extra: dict | None = None):
    """What tracking.train_tracked does after training: save the model folder, log it, register it."""
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("aetrack").experiment_id):
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = modelio.save(model, info, Path(tmp) / "aetrack-model", extra)
            return artifacts.log_generator(model_dir, registered_model_name=name)


def serve_model(model_uri: str, root: Path, tracking_uri: str | None = None, timeout: float = 180.0,
                env: dict[str, str] | None = None):
    """`mlflow models serve --env-manager local` on a free loopback port, with `env` added to this
    process's environment; returns (url, process)."""
    port = free_port()
    env = {**os.environ, **(env or {}), "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # it execs `uvicorn`
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    log_path = root / f"models-serve-{port}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(VENV_BIN / "mlflow"), "models", "serve", "-m", model_uri, "-h", "127.0.0.1", "-p", str(port),
             "--env-manager", "local"],
            stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/ping", process, timeout)
    except Exception:
        stop_server(process)
        raise RuntimeError(log_path.read_text()[-3000:]) from None
    return url, process


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (mlflow and the uvicorn it started), SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue


def scoring_process(process: subprocess.Popen) -> int:
    """The pid of the uvicorn process that `mlflow models serve` (`process`) started: the one that answers."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == process.pid:
                return int(stat.parent.name)
    raise RuntimeError(f"no child of {process.pid}")


def memory_mb(pid: int) -> dict[str, float]:
    """Resident memory now ("rss") and at its highest since the last `reset_peak` ("peak"), in MB."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss": int(status["VmRSS"].split()[0]) / 1024, "peak": int(status["VmHWM"].split()[0]) / 1024}


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current RSS


# No traceback, no file or module path, no MLflow field beyond the two that aetrack promises.
LEAKS = re.compile(r'Traceback|File "|\.py\b|site-packages|stack_trace|(?:/[\w.-]+){2,}')


def assert_one_line_refusal(response: requests.Response, status: int | None = None) -> str:
    """A 4xx (`status` if given) with {"error_code", "message"}, the message one short line; returns it."""
    assert 400 <= response.status_code < 500 and response.status_code == (status or response.status_code), \
        f"{response.status_code}: {response.text[:500]}"
    error = response.json()
    assert sorted(error) == ["error_code", "message"], error
    assert "\n" not in error["message"] and len(error["message"]) <= serving_guard.MAX_MESSAGE, error["message"]
    assert not LEAKS.search(response.text), response.text[:500]
    return error["message"]


def png(array: np.ndarray) -> str:
    """(H, W) floats in [0, 1] -> base64 PNG."""
    return serving.encode_png(torch.as_tensor(array, dtype=torch.float32).unsqueeze(0))


def read_png(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


# ----- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    return datasets.load("digits", seed=0)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    uri = new_store(root)
    with tracking(uri):
        yield root, uri


@pytest.fixture(scope="module")
def served(store, digits):
    """The trained cvae, registered, aliased champion and served as models:/aetrack-digits-cvae@champion:
    (url, pid of the process that answers)."""
    root, uri = store
    model, _ = fit(LABEL_CONFIG, digits, progress=False)
    logged = log_and_register(model, modelio.ModelInfo(LABEL_CONFIG, digits.shape, digits.classes), NAME)
    MlflowClient(uri).set_registered_model_alias(NAME, "champion", logged.registered_model_version)
    url, process = serve_model(f"models:/{NAME}@champion", root, uri)
    yield url, scoring_process(process)
    stop_server(process)


@pytest.fixture(scope="module")
def server(served):
    return served[0]


def post(url: str, body) -> requests.Response:
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(f"{url}/invocations", data=data, headers={"Content-Type": "application/json"}, timeout=60)


def predictions(url: str, body) -> list[dict]:
    response = post(url, body)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


# ----- the served model ------------------------------------------------------------------------

def test_samples_are_pngs_of_the_model_size(server):
    answer = predictions(server, {"dataframe_records": [{"n": 3, "label": 4}], "params": {"seed": 1}})
    assert [record["row"] for record in answer] == [0, 0, 0]
    assert [record["label"] for record in answer] == [4, 4, 4]
    for record in answer:
        picture = read_png(record["image"])
        assert (picture.format, picture.size, picture.mode) == ("PNG", (8, 8), "L")


def test_the_same_seed_gives_the_same_bytes(server):
    body = {"dataframe_records": [{"n": 4}, {"n": 2, "label": 1}], "params": {"seed": 7}}
    first, again = post(server, body), post(server, body)
    other = post(server, {**body, "params": {"seed": 8}})
    assert first.status_code == again.status_code == other.status_code == 200
    assert first.content == again.content
    assert first.json() != other.json()


def test_without_a_seed_each_request_draws_anew(server):
    body = {"dataframe_records": [{"n": 2, "label": 3}]}
    assert predictions(server, body) != predictions(server, body)


def test_temperature_scales_the_prior_noise(server):
    cold = predictions(server, {"dataframe_records": [{"n": 2, "label": 5}], "params": {"seed": 0, "temperature": 0.0}})
    warm = predictions(server, {"dataframe_records": [{"n": 2, "label": 5}], "params": {"seed": 0, "temperature": 1.0}})
    assert cold[0]["image"] == cold[1]["image"]  # no noise: both are the decoded prior mean
    assert warm[0]["image"] != warm[1]["image"]


def test_labels_are_respected(server):
    """A classifier fitted on the real digits reads the label the model was asked for."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    real = load_digits()
    classifier = SVC().fit(real.data / 16.0, real.target)
    body = {"dataframe_records": [{"n": 20, "label": label} for label in range(10)], "params": {"seed": 0}}
    answer = predictions(server, body)
    asked = np.array([record["label"] for record in answer])
    assert (asked == np.repeat(np.arange(10), 20)).all()
    pixels = np.stack([np.asarray(read_png(record["image"]), dtype=np.float64).ravel() / 255 for record in answer])
    accuracy = (classifier.predict(pixels) == asked).mean()
    assert accuracy >= 0.8, f"only {accuracy:.0%} of the samples read as the label asked for"


def test_array_output_matches_the_png(server):
    body = {"dataframe_records": [{"n": 2, "label": 2}], "params": {"seed": 3}}
    pngs = predictions(server, body)
    arrays = predictions(server, {**body, "params": {"seed": 3, "output": "array"}})
    for as_png, as_array in zip(pngs, arrays):
        assert "image" not in as_array and len(as_array["pixels"]) == 64
        pixels = np.array(as_array["pixels"])
        assert 0 <= pixels.min() and pixels.max() <= 1
        decoded = np.asarray(read_png(as_png["image"]), dtype=np.float64).ravel() / 255
        assert np.abs(decoded - pixels).max() <= 0.5 / 255 + 1e-6


def test_reconstructions_resemble_their_inputs(server, digits):
    x, y = digits.test_x[:20, 0].numpy(), digits.test_y[:20].tolist()
    rows = [{"image": png(image), "label": label} for image, label in zip(x[:10], y[:10])]
    rows += [{"pixels": image.ravel().tolist(), "label": label} for image, label in zip(x[10:], y[10:])]
    answer = predictions(server, {"dataframe_records": rows, "params": {"output": "array"}})
    assert [record["row"] for record in answer] == list(range(20))
    recon, inputs = np.array([record["pixels"] for record in answer]), x.reshape(20, -1)
    # Each reconstruction against its own input and against the next test image of another class.
    other = [next(j for j in range(i + 1, i + 20) if y[j % 20] != y[i]) % 20 for i in range(20)]
    own_error, other_error = np.abs(recon - inputs).mean(1), np.abs(recon - inputs[other]).mean(1)
    assert (own_error < other_error).mean() >= 0.8


LATENT = [0.0] * LABEL_CONFIG.latent_dim
FORMATS = {  # name: (request, images in the answer)
    "dataframe_records": ({"dataframe_records": [{"n": 2, "label": 0}, {"latent": LATENT, "label": 1},
                                                 {"pixels": [0.5] * 64, "label": 2}]}, 4),
    "dataframe_split": ({"dataframe_split": {"columns": ["n", "latent", "label"],
                                             "data": [[2, None, 0], [None, LATENT, 1], [None, LATENT, 2]]}}, 4),
    "inputs records": ({"inputs": [{"n": 2, "label": 0}, {"latent": LATENT, "label": 1},
                                   {"image": png(np.zeros((8, 8))), "label": 2}]}, 4),
    "inputs columns": ({"inputs": {"latent": [LATENT] * 3, "label": [0, 1, 2]}}, 3),
    "instances": ({"instances": [{"n": 1, "label": 0}, {"n": 2, "label": 1}, {"n": 1, "label": 2}]}, 4),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_request_format(server, fmt):
    request, count = FORMATS[fmt]
    answer = predictions(server, {**request, "params": {"seed": 0}})
    assert len(answer) == count
    assert sorted({record["label"] for record in answer}) == [0, 1, 2]
    assert all(read_png(record["image"]).size == (8, 8) for record in answer)


def test_the_signature_and_input_example_show_how_to_call_it(server, store):
    root, uri = store
    model_uri = f"models:/{NAME}/{MlflowClient(uri).get_model_version_by_alias(NAME, 'champion').version}"
    signature = mlflow.models.get_model_info(model_uri).signature
    assert signature.inputs.input_names() == ["n", "latent", "image", "pixels", "label"]
    assert [param.name for param in signature.params] == ["seed", "temperature", "output"]
    assert signature.outputs.input_names() == ["row", "label", "image", "pixels"]
    answer = predictions(server, load_serving_example(model_uri))
    assert {record["row"] for record in answer} == {0, 1, 2}


def png_declaring(width: int, height: int, pixel_data: bytes) -> str:
    """A base64 grey PNG whose header says width x height, whatever `pixel_data` (zlib-compressed) holds."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixel_data) + chunk(b"IEND", b"")
    return base64.b64encode(raw).decode("ascii")


BOMB = png_declaring(100_000, 100_000, zlib.compress(bytes(1000)))  # 10 G pixels declared in 100 bytes
DAMAGED = png_declaring(8, 8, b"not zlib data at all")
NAN_LATENT = "[0, NaN, 0, 0, 0, 0, 0, 0]"
HUGE = "9" * 4000  # digits: under Python's limit of 4300, far beyond any float
BAD_REQUESTS = [
    ({"dataframe_records": [{"label": 1}]}, "exactly one of the fields n, latent"),
    ({"dataframe_records": [{"n": 1, "latent": LATENT}]}, "exactly one of the fields n, latent"),
    ({"dataframe_records": [{"lable": 1}]}, "input: no row has any of the fields n, latent"),
    ({"dataframe_records": [{"n": 1}, {"latnet": LATENT}]}, "row 1: give exactly one of the fields n, latent"),
    ({"dataframe_records": [{"n": "two"}]}, "n: expected a whole number"),
    ({"dataframe_records": [{"n": 1.5}]}, "n: expected a whole number"),
    ({"dataframe_records": [{"n": 5000}]}, "n: must be between 1 and 1024"),
    ('{"dataframe_records": [{"n": %s}]}' % HUGE, "n: must be between 1 and 1024, got 999"),
    ({"dataframe_records": [{"n": 600}, {"n": 600}]}, "n: at most 1024 images per request"),
    ({"dataframe_records": [{"n": 1, "label": 10}]}, "label: must be between 0 and 9"),
    ({"dataframe_records": [{"n": 1, "label": -1}]}, "label: must be between 0 and 9"),
    ({"dataframe_records": [{"latent": [0.0] * 3}]}, "latent: expected 8 numbers"),
    ({"dataframe_records": [{"latent": "zero"}]}, "latent: expected a list of numbers"),
    ({"dataframe_records": [{"latent": [[0], [0, 0]]}]}, "latent: expected a list of numbers (of equal lengths when nested)"),
    ('{"dataframe_records": [{"latent": [%s, 0, 0, 0, 0, 0, 0, 0]}]}' % HUGE, "latent: a number is too large"),
    ('{"dataframe_records": [{"latent": %s}]}' % NAN_LATENT, "latent: NaN or infinity"),
    ('{"dataframe_records": [{"pixels": [%s], "label": 0}]}' % ", ".join(["Infinity"] * 64), "pixels: NaN or infinity"),
    ({"dataframe_records": [{"pixels": [2.0] * 64, "label": 0}]}, "pixels: values must lie in [0, 1]"),
    ({"dataframe_records": [{"pixels": [0.5] * 65, "label": 0}]}, "pixels: expected 64 numbers"),
    ({"dataframe_records": [{"pixels": [[0.5] * 8] * 7 + [[0.5] * 9], "label": 0}]}, "pixels: expected a list of numbers (of equal"),
    ({"dataframe_records": [{"image": png(np.zeros((9, 8))), "label": 0}]}, "image: expected 8x8 pixels, got 8x9"),
    ({"dataframe_records": [{"image": BOMB, "label": 0}]}, "image: expected 8x8 pixels, got a PNG that declares far more"),
    ({"dataframe_records": [{"image": DAMAGED, "label": 0}]}, "image: cannot decode the PNG"),
    ({"dataframe_records": [{"image": "bm90IGEgcG5n", "label": 0}]}, "image: not a base64-encoded PNG"),
    ({"dataframe_records": [{"image": png(np.zeros((8, 8)))}]}, "label: a cvae model needs the label of the image"),
    ({"dataframe_records": [{"n": 1}], "params": {"output": "jpeg"}}, "output: must be one of png, array"),
    ({"dataframe_records": [{"n": 1}], "params": {"output": "x" * 100_000}}, "output: must be one of png, array, got 'xxx"),
    ({"dataframe_records": [{"n": 1}], "params": {"seed": -3}}, "seed: must be between 0"),
    ({"dataframe_records": [{"n": 1}], "params": {"temperature": -1.0}}, "temperature: must be a number from 0 to 100"),
    ('{"dataframe_records": [{"n": 1}], "params": {"temperature": NaN}}', "temperature: must be a number from 0 to 100"),
    ({"dataframe_records": [{"n": 1}], "params": {"temperature": 1e39}}, "temperature: must be a number from 0 to 100"),
    ({"inputs": [1, 2, 3]}, "input: no row has any of the fields"),
]


@pytest.mark.parametrize("body, message", BAD_REQUESTS, ids=[message for _, message in BAD_REQUESTS])
def test_bad_requests_get_400_with_one_line_naming_the_field(server, body, message):
    assert message in assert_one_line_refusal(post(server, body), 400)
    assert len(predictions(server, {"dataframe_records": [{"n": 1}]})) == 1  # and the next good request is answered


def test_params_of_the_wrong_type_are_refused_by_mlflow_in_one_line(server):
    """MLflow checks param types against the ParamSchema before the model runs: its words, on one line."""
    response = post(server, {"dataframe_records": [{"n": 1}], "params": {"seed": "seven"}})
    assert assert_one_line_refusal(response, 400).startswith("params: seed: ")
    assert len(predictions(server, {"dataframe_records": [{"n": 1}]})) == 1


JSON = {"Content-Type": "application/json"}
# What MLflow's layer answered with a 500, a stack trace or a quote of the input before aetrack's guard:
# (body, headers, status, message).
MLFLOW_LAYER = {
    "no Content-Type": ('{"dataframe_records": [{"n": 1}]}', {}, 415, "Content-Type: missing"),
    "text/csv": ("n\n1\n", {"Content-Type": "text/csv"}, 415, "expected application/json, got 'text/csv'"),
    "parquet": (b"PAR1\0\0PAR1", {"Content-Type": "application/vnd.apache.parquet"}, 415, "expected application/json"),
    "latin-1": ('{"dataframe_records": [{"n": 1}]}', {"Content-Type": "application/json; charset=latin-1"}, 415,
                "the only parameter allowed is charset=utf-8"),
    "JSON nested 100,000 deep": ("[" * 100_000 + "]" * 100_000, JSON, 400, "body: more than 65536 arrays and objects"),
    "JSON nested 50,000 deep": ("[" * 50_000 + "]" * 50_000, JSON, 400, "body: JSON nested more than 32 deep"),
    "JSON nested 40 deep in a row": ('{"dataframe_records": [{"latent": %s0%s}]}' % ("[" * 40, "]" * 40), JSON, 400,
                                     "body: JSON nested more than 32 deep"),
    "a 5,000-digit integer": ('{"dataframe_records": [{"n": %s}]}' % ("9" * 5000), JSON, 400,
                              "body: a number has more than 4300 digits"),
    "not UTF-8": (b'{"dataframe_records": [{"n": 1, "x": "\xff"}]}', JSON, 400, "body: not UTF-8"),
    "not JSON": ('{"dataframe_records": [{"n": 1}]', JSON, 400, "body: not valid JSON"),
    "empty": ("", JSON, 400, "body: not valid JSON"),
    "an array": ('[{"n": 1}]', JSON, 400, "body: expected a JSON object with one of the keys"),
    "no input key": ('{"rows": [{"n": 1}]}', JSON, 400, "body: give exactly one of the keys dataframe_records, "
                                                        "dataframe_split, inputs, instances (got none)"),
    "two input keys": ('{"dataframe_records": [{"n": 1}], "inputs": [{"n": 1}]}', JSON, 400,
                       "(got dataframe_records, inputs)"),
    "params not an object": ('{"dataframe_records": [{"n": 1}], "params": [1]}', JSON, 400,
                             "params: expected a JSON object, got an array"),
    "2,000 rows": (json.dumps({"dataframe_records": [{"n": 1}] * 2000}), JSON, 400, "dataframe_records: at most 1024 rows"),
    "100,000 empty arrays": ('{"inputs": {"n": [%s]}}' % ",".join(["[]"] * 100_000), JSON, 400,
                             "body: more than 65536 arrays and objects"),
    "100 fields": (json.dumps({"dataframe_records": [{f"f{i}": 1 for i in range(100)}]}), JSON, 400,
                   "at most 16 fields per row"),
    "duplicate columns": ('{"dataframe_split": {"columns": ["n", "n"], "data": [[1, 2]]}}', JSON, 400,
                          "input: MLflow cannot read it as a table of the model's fields"),
    "columns of unequal length": ('{"inputs": {"n": [1], "label": [1, 2]}}', JSON, 400,
                                  "input: MLflow cannot read it as a table of the model's fields"),
    "records that are not objects": ('{"dataframe_records": [{"n": 1}, 5]}', JSON, 400,
                                     "dataframe_records field is not a valid dataframe"),
}


@pytest.mark.parametrize("case", MLFLOW_LAYER)
def test_what_mlflow_cannot_read_gets_a_one_line_4xx(server, case):
    body, headers, status, message = MLFLOW_LAYER[case]
    data = body.encode() if isinstance(body, str) else body
    response = requests.post(f"{server}/invocations", data=data, headers=headers, timeout=60)
    assert message in assert_one_line_refusal(response, status)
    assert len(predictions(server, {"dataframe_records": [{"n": 1}]})) == 1


def test_a_foreign_host_gets_403_and_a_loopback_one_an_answer(server):
    """DNS rebinding: a page of attacker.example whose name now points at 127.0.0.1 sends its own Host."""
    port = server.rsplit(":", 1)[1]
    body = json.dumps({"dataframe_records": [{"n": 1}]})
    for host, status in ((f"attacker.example:{port}", 403), (f"localhost:{port}", 200), (f"127.0.0.1:{port}", 200)):
        response = requests.post(f"{server}/invocations", data=body, timeout=60,
                                 headers={"Content-Type": "application/json", "Host": host})
        assert response.status_code == status, (host, response.text[:200])
    assert requests.get(f"{server}/ping", headers={"Host": "attacker.example"}, timeout=10).status_code == 200


def test_other_methods_and_paths_get_a_one_line_4xx(server):
    assert assert_one_line_refusal(requests.get(f"{server}/invocations", timeout=10), 405) == "Method Not Allowed"
    assert assert_one_line_refusal(requests.post(f"{server}/predict", json={}, timeout=10), 404) == "Not Found"


# ----- the body limit ----------------------------------------------------------------------------

def read_response(connection: socket.socket) -> tuple[int, dict]:
    """(status, JSON body) of one HTTP/1.1 answer with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(65536) or pytest.fail(f"connection closed after {data!r}")
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])
    while len(body) < length:
        body += connection.recv(65536) or pytest.fail("connection closed in the body")
    return int(head.split()[1]), json.loads(body)


LIMIT = serving_guard.max_body_bytes({})


def test_a_200_mb_body_is_refused_before_it_is_sent(served):
    """Content-Length says 200 MB: the 413 comes at once, before the client sends a byte of the body."""
    url, pid = served
    port = int(url.rsplit(":", 1)[1])
    reset_peak(pid)
    before = memory_mb(pid)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(f"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           f"Content-Length: {200 << 20}\r\n\r\n".encode())
        status, error = read_response(connection)
    assert status == 413 and error["message"] == (f"body: {200 << 20} bytes, more than the limit of {LIMIT} "
                                                  f"(AETRACK_SERVE_MAX_BODY)")
    assert memory_mb(pid)["peak"] - before["rss"] < 20
    assert len(predictions(url, {"dataframe_records": [{"n": 1}]})) == 1


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_200_mb_body_leaves_the_server_memory_as_it_was(served, framing):
    """An ordinary client that sends all 200 MB gets 413; without a length, the server stops keeping
    the body at the limit. Before the guard, such a body took the server from 0.9 to 2.1 GB."""
    url, pid = served
    body = bytes(200 << 20) if framing == "content-length" else (bytes(1 << 20) for _ in range(200))
    reset_peak(pid)
    before = memory_mb(pid)
    started = time.perf_counter()
    response = requests.post(f"{url}/invocations", data=body, headers=JSON, timeout=120)
    assert "more than the limit of" in assert_one_line_refusal(response, 413)
    assert time.perf_counter() - started < 30
    grown = memory_mb(pid)["peak"] - before["rss"]
    assert grown < 3 * LIMIT / 2**20, f"the server's peak memory grew by {grown:.0f} MB"
    assert len(predictions(url, {"dataframe_records": [{"n": 1}]})) == 1


# ----- in-process: every variant, internal errors, loading safety --------------------------------

def tiny_model(name: str, digits):
    config = TrainConfig(model=name, hidden=(16,), latent_dim=3, prior_components=2,
                         features=STAND_IN_M1 if REGISTRY[name].stacked else "")
    model = build_model(config, digits.shape, digits.num_classes, data=digits, load=stand_in_m1(digits)).eval()
    extra = {}
    if not REGISTRY[name].generative:  # a plain autoencoder generates from a mixture fitted to its codes
        extra = samplers.LatentMixture.fit(samplers.encode_all(model, digits.train_x[:200]), components=2).state()
    return model, modelio.ModelInfo(config, digits.shape, digits.classes), extra


@pytest.fixture(scope="module")
def variants(store, digits):
    """Every registered variant, untrained, logged and registered as aetrack-digits-<name>."""
    logged = {}
    for name in sorted(REGISTRY):
        model, info, extra = tiny_model(name, digits)
        logged[name] = log_and_register(model, info, f"aetrack-digits-{name}", extra).model_uri
    return logged


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_variant_answers_every_kind_of_request(variants, digits, name):
    pyfunc = mlflow.pyfunc.load_model(variants[name])
    label = {"label": 7} if REGISTRY[name].conditional else {}
    x = digits.test_x[0, 0].numpy()
    rows = [{"n": 3, **label}, {"latent": [0.1, -0.2, 0.3], **label}, {"image": png(x), **label},
            {"pixels": x.ravel().tolist(), **label}]
    answer = pyfunc.predict(rows, params={"seed": 0})
    assert answer["row"].tolist() == [0, 0, 0, 1, 2, 3]
    assert all(read_png(text).size == (8, 8) for text in answer["image"])
    assert ("label" in answer.columns) == REGISTRY[name].conditional
    if name == "m2":  # without a label, m2 reconstructs with the class its classifier reads
        assert 0 <= pyfunc.predict([{"image": png(x)}])["label"][0] <= 9


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_temperature_accepted_gives_finite_pixels(variants, name):
    """1e39 once overflowed the prior noise to NaN pixels (invalid JSON for strict parsers) with a 200."""
    pyfunc = mlflow.pyfunc.load_model(variants[name])
    label = {"label": 3} if REGISTRY[name].conditional else {}
    answer = pyfunc.predict([{"n": 4, **label}], params={"seed": 0, "temperature": serving.MAX_TEMPERATURE,
                                                         "output": "array"})
    pixels = np.array(answer["pixels"].tolist())
    assert np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1
    for too_hot in (1e39, serving.MAX_TEMPERATURE * 1.01, float("inf")):
        with pytest.raises(serving.ServingError, match="temperature: must be a number from 0 to 100"):
            pyfunc.predict([{"n": 1, **label}], params={"seed": 0, "temperature": too_hot})


@pytest.mark.slow
def test_an_unexpected_failure_is_a_one_line_500(variants):
    from mlflow.pyfunc import scoring_server

    pyfunc = mlflow.pyfunc.load_model(variants["vae"])
    pyfunc.unwrap_python_model().model = None  # a bug inside predict
    with pytest.raises(serving.ServingError) as raised:
        scoring_server.invocations('{"dataframe_records": [{"n": 1}]}', "application/json", pyfunc, None)
    assert raised.value.get_http_status_code() == 500
    payload = json.loads(raised.value.serialize_as_json())
    assert payload["message"].startswith("internal error: ") and "stack_trace" not in payload


@pytest.mark.slow
def test_loading_never_unpickles(variants, tmp_path):
    local = Path(mlflow.artifacts.download_artifacts(variants["vae"], dst_path=str(tmp_path)))
    flavor = mlflow.models.Model.load(local).flavors["python_function"]
    assert "model_code_path" in flavor and "python_model" not in flavor
    assert not [path for path in local.rglob("*") if path.suffix in (".pkl", ".pickle")]

    class Payload:  # what a doctored weights file could carry
        def __reduce__(self):
            return (Path.touch, (tmp_path / "code-ran",))

    weights = next(local.rglob(modelio.WEIGHTS_FILE))
    torch.save({"model": Payload(), "extra": {}}, weights)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        mlflow.pyfunc.load_model(str(local))
    assert not (tmp_path / "code-ran").exists()


def test_the_served_requirements_pin_what_is_installed_and_skip_what_is_not(monkeypatch):
    import importlib.metadata as md

    real = md.version
    installed = {"mlflow-skinny": "3.17.2"}

    def version(name):
        if name in ("mlflow", "pandas"):  # only mlflow-skinny, and no pandas, as on a bare GPU image
            raise md.PackageNotFoundError(name)
        return installed.get(name) or real(name)

    monkeypatch.setattr(md, "version", version)
    pins = serving.requirements()
    assert "mlflow==3.17.2" in pins and not any(pin.startswith("pandas") for pin in pins)
    assert f"torch=={real('torch')}" in pins


# --- the PNGs the generator writes itself (no PIL per request) are the pictures PIL wrote ---

def pil_png(image: torch.Tensor) -> str:
    """The encoder it replaced, word for word."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    pil = Image.fromarray(array[0], "L") if array.shape[0] == 1 else Image.fromarray(array.transpose(1, 2, 0), "RGB")
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@pytest.mark.parametrize("shape", [(64, 1, 8, 8), (3, 1, 28, 28), (4, 3, 32, 32), (2, 1, 9, 7), (1, 3, 1, 1)])
def test_encoded_pngs_hold_the_same_pixels_as_pils(shape):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(shape, generator=generator) * 1.2 - 0.1  # outside [0, 1] too: clamped
    images[0].view(-1)[:4] = torch.tensor([0.5 / 255, 1.5 / 255, 2.5 / 255, 0.5])[: images[0].numel()]  # halves: to even
    pngs = encode_pngs(images)
    assert len(pngs) == shape[0]
    for image, text in zip(images, pngs):
        picture = Image.open(io.BytesIO(base64.b64decode(text)))
        assert picture.format == "PNG" and picture.mode == ("L" if shape[1] == 1 else "RGB")
        assert picture.size == (shape[3], shape[2])
        assert np.array_equal(decode_png(text), decode_png(pil_png(image)))
        assert encode_png(image) == text
    picture = Image.open(io.BytesIO(base64.b64decode(pngs[0])))
    picture.verify()  # chunk lengths and CRCs


def test_the_same_images_give_the_same_bytes():
    images = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert encode_pngs(images) == encode_pngs(images.clone())


# --- the entry files MLflow runs to load a logged model ("models from code") ---

@pytest.mark.parametrize(("entry", "cls"), [("pyfunc_model.py", "GeneratorModel"), ("reference_model.py", "ReferencePyfunc")])
def test_each_entry_file_sets_its_pyfunc_model_without_loading_weights(entry, cls):
    from mlflow.models import model as mlflow_model

    from conftest import run_entry_file

    before = mlflow_model.__mlflow_model__
    try:
        run_entry_file(Path(serving.__file__).with_name(entry))
        assert type(mlflow_model.__mlflow_model__).__name__ == cls
        assert not hasattr(mlflow_model.__mlflow_model__, "model")  # weights load in load_context, from the artifacts
    finally:
        mlflow_model.__mlflow_model__ = before
