"""Thousands of generated requests, good, odd and hostile, against a real `mlflow models serve`.

An untrained cvae on `digits` is served once for the module with a body limit of 256 KiB set
through AETRACK_SERVE_MAX_BODY. Hypothesis builds bodies from what aetrack and MLflow read (the four
input forms, every field and param, PNGs good and bad, ragged, deep and huge values) and from
what neither expects (any JSON, any bytes, cut or spliced bodies, odd Content-Types). Every answer
must be a 200 with predictions or a one-line 4xx; the server's memory must stay where it was, and
a good request must get the same bytes after as before.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import os
from datetime import timedelta

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow import MlflowClient

from aetrack import data as datasets
from aetrack import modelio
from aetrack.serving import guard as serving_guard
from aetrack.config import TrainConfig
from aetrack.models import build_model
from test_serving import (BOMB, DAMAGED, JSON, assert_one_line_refusal, log_and_register, memory_mb, new_store, png,
                          reset_peak, scoring_process, serve_model, stop_server, tracking)

EXAMPLES = int(os.environ.get("AETRACK_FUZZ_EXAMPLES", "2500"))  # 40-50 s on two busy cores
LIMIT = "256K"
LATENT_DIM = 3
FIELDS = ("n", "latent", "image", "pixels", "label")
FORMS = ("dataframe_records", "dataframe_split", "inputs", "instances")


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    """An untrained cvae served with a body limit of 256 KiB: (url, pid of the process that answers)."""
    root = tmp_path_factory.mktemp("serving-fuzz")
    uri = new_store(root)
    digits = datasets.load("digits", seed=0)
    config = TrainConfig(model="cvae", hidden=(16,), latent_dim=LATENT_DIM)
    model = build_model(config, digits.shape, digits.num_classes).eval()
    with tracking(uri):
        logged = log_and_register(model, modelio.ModelInfo(config, digits.shape, digits.classes), "aetrack-fuzz-cvae")
    MlflowClient(uri).set_registered_model_alias("aetrack-fuzz-cvae", "champion", logged.registered_model_version)
    url, process = serve_model("models:/aetrack-fuzz-cvae@champion", root, uri,
                               env={serving_guard.MAX_BODY_VARIABLE: LIMIT})
    yield url, scoring_process(process)
    stop_server(process)


# ----- bodies -----------------------------------------------------------------------------------

class Raw(str):
    """A JSON token written as it is: numbers that json.dumps cannot write, or deep brackets."""


def dump(value) -> str:
    """JSON text of `value`, Raw tokens as they are, NaN and Infinity as Python's json writes them."""
    if isinstance(value, Raw):
        return value
    if isinstance(value, list):
        return "[" + ", ".join(map(dump, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(key)}: {dump(item)}" for key, item in value.items()) + "}"
    return json.dumps(value)


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """Draw from one of the strategies, each as often as its weight says."""
    return st.sampled_from([strategy for weight, strategy in choices for _ in range(weight)]).flatmap(lambda chosen: chosen)


unit = st.floats(0, 1)
odd_numbers = st.sampled_from([Raw("9" * 400), Raw("-" + "9" * 4000), Raw("1e400"), Raw("-0.0"), Raw("9" * 4400)])
numbers = st.one_of(st.integers(-5, 1100), st.integers(), st.floats(), unit, odd_numbers)
texts = st.text(max_size=12)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
pngs = st.one_of(
    st.sampled_from([png(np.zeros((8, 8))), png(np.ones((8, 8)) / 2), png(np.zeros((9, 8))), png(np.zeros((28, 28))),
                     BOMB, DAMAGED, "bm90IGEgcG5n", "", "====", png(np.zeros((8, 8)))[:-8]]),
    st.binary(max_size=120).map(lambda raw: base64.b64encode(raw).decode()),
)
good_pngs = st.sampled_from([png(np.zeros((8, 8))), png(np.ones((8, 8)) / 2), png(np.eye(8))])
latents = st.lists(unit, min_size=LATENT_DIM, max_size=LATENT_DIM)
pixels = st.one_of(
    st.lists(unit, min_size=64, max_size=64),  # flat
    st.lists(st.lists(unit, min_size=8, max_size=8), min_size=8, max_size=8),  # [H][W]
    st.lists(st.lists(st.lists(unit, min_size=8, max_size=8), min_size=8, max_size=8), min_size=1, max_size=1),  # [C][H][W]
)
ragged = st.lists(st.lists(unit, max_size=9), min_size=2, max_size=9).filter(lambda rows: len(set(map(len, rows))) > 1)
deep = st.integers(1, 60).map(lambda depth: Raw("[" * depth + "0" + "]" * depth))
vectors = weighted((1, latents), (1, pixels), (1, st.lists(numbers, max_size=70)), (2, ragged), (1, deep))
cells = st.one_of(scalars, pngs, vectors, st.dictionaries(texts, scalars, max_size=3))
odd_values = weighted((5, vectors), (2, scalars), (2, pngs), (1, st.dictionaries(texts, scalars, max_size=3)))
keys = st.one_of(st.sampled_from(FIELDS), texts)
labels = st.integers(0, 9)
good_rows = st.one_of(
    st.fixed_dictionaries({"n": st.integers(1, 40)}, optional={"label": labels}),
    st.fixed_dictionaries({"latent": latents}, optional={"label": labels}),
    st.fixed_dictionaries({"image": good_pngs, "label": labels}),
    st.fixed_dictionaries({"pixels": pixels, "label": labels}),
)
good_params = st.fixed_dictionaries({}, optional={"seed": st.integers(0, 2**63 - 1), "temperature": st.floats(0, 3),
                                                  "output": st.sampled_from(["png", "array"])})
rows = st.one_of(good_rows, st.dictionaries(keys, cells, max_size=4), scalars, st.lists(cells, max_size=3))
records = st.lists(rows, max_size=5)
columns = st.dictionaries(keys, st.one_of(st.lists(cells, max_size=4), cells), max_size=4)
split = st.fixed_dictionaries(
    {}, optional={"columns": st.one_of(st.lists(keys, max_size=4), scalars),
                  "data": st.one_of(st.lists(st.lists(cells, max_size=4), max_size=4), records, scalars),
                  "index": st.one_of(st.lists(st.integers(-2, 5), max_size=5), scalars)})
tables = {"dataframe_records": st.one_of(records, columns, scalars),
          "dataframe_split": st.one_of(split, records, scalars),
          "inputs": st.one_of(records, columns, cells),
          "instances": st.one_of(records, columns, cells)}
params = st.one_of(
    st.fixed_dictionaries({}, optional={
        "seed": st.one_of(st.integers(0, 2**63 - 1), numbers, texts, st.none()),
        "temperature": st.one_of(st.floats(0, 3), numbers, texts, st.none()),
        "output": st.one_of(st.sampled_from(["png", "array"]), texts, scalars),
        "sed": scalars,  # misspelt: MLflow drops it
    }),
    scalars,
    st.lists(scalars, max_size=2),
)


@st.composite
def envelopes(draw) -> dict:
    forms = draw(st.one_of(st.sampled_from(FORMS).map(lambda form: [form]), st.lists(st.sampled_from(FORMS), max_size=3)))
    envelope = {form: draw(tables[form]) for form in forms}
    if draw(st.booleans()):
        envelope["params"] = draw(params)
    if draw(st.integers(0, 9)) == 0:
        envelope[draw(texts)] = draw(cells)
    return envelope


@st.composite
def requests_like(draw, odd: bool) -> dict:
    """Good rows and params in one of the four forms; `odd`: with one value of a row or param replaced."""
    table, params = draw(st.lists(good_rows, min_size=1, max_size=4)), draw(good_params)
    if odd:
        target = draw(st.integers(0, len(table)))
        if target == len(table):
            params[draw(st.sampled_from(["seed", "temperature", "output"]))] = draw(odd_values)
        else:
            row = table[target]
            name = draw(weighted((4, st.just(next(name for name in row if name != "label"))), (1, keys)))
            row[name] = draw(odd_values)
    form = draw(st.sampled_from(FORMS))
    if form == "dataframe_split":
        names = sorted({name for row in table for name in row})
        return {form: {"columns": names, "data": [[row.get(name) for name in names] for row in table]}, "params": params}
    return {form: table, "params": params}


any_json = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
                        max_leaves=20)


@st.composite
def spliced(draw) -> bytes:
    """A request body cut short, or with a few bytes put in somewhere."""
    body = dump(draw(envelopes())).encode()
    at = draw(st.integers(0, len(body)))
    return body[:at] + draw(st.binary(max_size=3)) + (body[at:] if draw(st.booleans()) else b"")


bodies = weighted(
    (2, requests_like(odd=False).map(lambda envelope: dump(envelope).encode())),
    (5, requests_like(odd=True).map(lambda envelope: dump(envelope).encode())),
    (3, envelopes().map(lambda envelope: dump(envelope).encode())),
    (1, any_json.map(lambda value: dump(value).encode())),
    (1, spliced()),
    (1, st.binary(max_size=300)),
    (1, envelopes().map(lambda envelope: (dump(envelope) + " " * 270_000).encode())),  # over the limit
)
content_types = weighted(
    (12, st.just("application/json")),
    (2, st.sampled_from(["application/json; charset=utf-8", "application/json; charset=latin-1", "application/json; q=1",
                         "text/csv", "application/vnd.apache.parquet", "text/plain", "Application/JSON", None])),
    (1, st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=20)),
)


# ----- the tests --------------------------------------------------------------------------------

GOOD = {"dataframe_records": [{"n": 2, "label": 3}, {"latent": [0.1, 0.2, 0.3], "label": 1}], "params": {"seed": 5}}


@pytest.mark.timeout(300)
def test_fuzzed_requests_get_an_answer_or_a_one_line_4xx(fuzz_server):
    url, pid = fuzz_server
    answers = collections.Counter()
    good = requests.post(f"{url}/invocations", json=GOOD, timeout=30)
    assert good.status_code == 200, good.text
    reset_peak(pid)
    before = memory_mb(pid)

    @settings(max_examples=EXAMPLES, deadline=timedelta(seconds=10), database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(body=bodies, content_type=content_types)
    def one_request(body: bytes, content_type: str | None):
        headers = {} if content_type is None else {"Content-Type": content_type}
        response = requests.post(f"{url}/invocations", data=body, headers=headers, timeout=30)
        if response.status_code == 200:
            assert isinstance(response.json()["predictions"], list)
            answers["200"] += 1
        else:
            assert_one_line_refusal(response)
            answers[f"{response.status_code} {response.json()['error_code']}"] += 1

    one_request()
    after = memory_mb(pid)
    print(f"{sum(answers.values())} requests: {dict(answers.most_common())}; server memory {before} -> {after}")
    # Every kind of answer came up: the generated bodies reach the model, and every check refuses some.
    assert answers["200"] and answers["400 INVALID_PARAMETER_VALUE"] and answers["400 BAD_REQUEST"]
    assert answers["413 REQUEST_ENTITY_TOO_LARGE"] and answers["415 UNSUPPORTED_MEDIA_TYPE"]
    assert after["peak"] - before["rss"] < 100 and after["rss"] - before["rss"] < 50, (before, after)
    again = requests.post(f"{url}/invocations", json=GOOD, timeout=30)
    assert again.status_code == 200 and again.content == good.content


def test_the_body_limit_is_read_from_the_environment(fuzz_server):
    url, _ = fuzz_server
    latent = json.dumps({"dataframe_records": [{"latent": [0.5] * 40_000}]})  # about 200 KB
    response = requests.post(f"{url}/invocations", data=latent, headers=JSON, timeout=30)
    assert "latent: expected 3 numbers, got shape [40000]" in assert_one_line_refusal(response, 400)
    padded = latent + " " * (262_144 - len(latent) + 1)  # one byte over 256 KiB
    response = requests.post(f"{url}/invocations", data=padded, headers=JSON, timeout=30)
    assert "more than the limit of 262144" in assert_one_line_refusal(response, 413)


# ----- the guard's parts, in-process ------------------------------------------------------------

@pytest.mark.parametrize("setting, size", [("", 8 << 20), ("1048576", 1 << 20), ("512K", 512 << 10), ("16M", 16 << 20),
                                           ("2MiB", 2 << 20), ("1g", 1 << 30)])
def test_the_body_limit_setting(setting, size):
    assert serving_guard.max_body_bytes({serving_guard.MAX_BODY_VARIABLE: setting}) == size


@pytest.mark.parametrize("setting", ["0", "-1", "1.5M", "lots", "16 T"])
def test_a_bad_body_limit_setting_is_one_line_naming_the_variable(setting):
    with pytest.raises(ValueError, match=f"^AETRACK_SERVE_MAX_BODY: expected a size .* got '{setting}'$"):
        serving_guard.max_body_bytes({serving_guard.MAX_BODY_VARIABLE: setting})


def walked_depth(value) -> int:
    if isinstance(value, dict):
        value = list(value.values())
    return 1 + max(map(walked_depth, value), default=0) if isinstance(value, list) else 0


tricky_texts = st.text(st.sampled_from('[]{}"\\,:aé'), max_size=8)


@pytest.mark.slow
@settings(max_examples=500, deadline=None, database=None)
@given(value=st.recursive(st.one_of(tricky_texts, st.integers()),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(tricky_texts, inner, max_size=3),
                          max_leaves=60),
       ascii_only=st.booleans())
def test_nesting_depth_is_the_depth_of_the_parsed_json(value, ascii_only):
    """Brackets, quotes and backslashes inside strings do not count; only real nesting does."""
    text = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert serving_guard.nesting_depth(text) == min(walked_depth(value), serving_guard.MAX_DEPTH + 1)


def call(app, body: bytes = b'{"inputs": [{"n": 1}]}', content_type: bytes = b"application/json",
         headers: list[tuple[bytes, bytes]] | None = None, path: str = "/invocations",
         limits: serving_guard.Limits = serving_guard.Limits(max_body=1 << 20, max_rows=1024)) -> tuple[int, dict]:
    """One POST through RequestGuard(app), in-process, from a loopback Host unless `headers` say otherwise:
    (status, JSON answer)."""
    guard = serving_guard.RequestGuard(app, limits)
    if headers is None:
        headers = [(b"host", b"127.0.0.1:5001"), (b"content-type", content_type)]
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    async def run():
        try:
            await guard(scope, receive, send)
        except RuntimeError:
            pass  # re-raised for uvicorn's log, once the answer has gone

    asyncio.run(run())
    assert [message["type"] for message in sent] == ["http.response.start"] + ["http.response.body"] * (len(sent) - 1)
    return sent[0]["status"], json.loads(b"".join(message["body"] for message in sent[1:]))


def answering(status: int, body: bytes):
    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": body[:5], "more_body": True})
        await send({"type": "http.response.body", "body": body[5:]})
    return app


def test_an_error_answer_from_mlflow_is_rewritten_to_one_line_without_trace_or_echo():
    mlflow_answer = json.dumps({
        "error_code": "INVALID_PARAMETER_VALUE", "stack_trace": 'Traceback (most recent call last):\n  File "/x/y.py"',
        "message": "Failed to predict data '   n  n\n0  1  2'. \nError: Failed to enforce schema of data '   n  n\n0  1  2' "
                   "with schema '['n': Any (optional)]'. Error: Length of values (2) does not match length of index (1)",
    }).encode()
    assert call(answering(400, mlflow_answer)) == (400, {
        "error_code": "INVALID_PARAMETER_VALUE",
        "message": "input: MLflow cannot read it as a table of the model's fields: Length of values (2) does not match "
                   "length of index (1)"})
    assert call(answering(415, b"This predictor only supports\nthe following content types")) == (
        415, {"error_code": "UNSUPPORTED_MEDIA_TYPE", "message": "This predictor only supports the following content types"})
    long = call(answering(400, b"x" * 10_000))[1]["message"]
    assert len(long) == serving_guard.MAX_MESSAGE and long.endswith("...")


def test_an_answer_below_400_passes_untouched():
    assert call(answering(200, b'{"predictions": [], "stack_trace": "\\n"}')) == (200, {"predictions": [], "stack_trace": "\n"})


def test_an_exception_that_escapes_mlflow_is_a_one_line_500():
    async def broken(scope, receive, send):
        raise RuntimeError("a bug, with /a/path/in/it.py")

    assert call(broken) == (500, {"error_code": "INTERNAL_SERVER_ERROR", "message": "internal error: RuntimeError"})


def test_the_guard_checks_the_content_type_that_mlflow_reads_the_first():
    """Starlette's headers.get, which MLflow's scoring server reads, gives a repeated header's first value."""
    ok = answering(200, b'{"predictions": []}')
    status, answer = call(ok, headers=[(b"host", b"127.0.0.1:5001"), (b"content-type", b"text/csv"),
                                       (b"content-type", b"application/json")])
    assert status == 415 and "got 'text/csv'" in answer["message"]
    assert call(ok, headers=[(b"host", b"127.0.0.1:5001"), (b"content-type", b"application/json"),
                             (b"content-type", b"text/csv")])[0] == 200


@pytest.mark.parametrize("host, allowed, status", [
    (b"127.0.0.1:5001", serving_guard.LOOPBACK_HOSTS, 200),
    (b"localhost:5001", serving_guard.LOOPBACK_HOSTS, 200),
    (b"[::1]:5001", serving_guard.LOOPBACK_HOSTS, 200),
    (b"[::1]:5001", ("[[]::1]:*",), 200),  # MLflow's fnmatch spelling of a literal `[`, as `aetrack serve` hands it
    (b"1:5001", ("[[]::1]:*",), 403),
    (b"attacker.example:5001", serving_guard.LOOPBACK_HOSTS, 403),  # a rebound name: the page's origin, our address
    (None, serving_guard.LOOPBACK_HOSTS, 403),
    (b"gen.example.org:5001", ("gen.example.org:5001",), 200),
    (b"gen.example.org:5001", ("*",), 200),
])
def test_a_host_not_allowed_gets_403_before_mlflow_reads_anything(host, allowed, status):
    limits = serving_guard.Limits(max_body=1 << 20, max_rows=1024, allowed_hosts=allowed)
    headers = [(b"content-type", b"application/json")] + ([(b"host", host)] if host else [])
    answer = call(answering(200, b'{"predictions": []}'), headers=headers, limits=limits)
    assert answer[0] == status, answer
    if status == 403:
        assert answer[1]["message"].startswith("Host: ") and "AETRACK_SERVE_ALLOWED_HOSTS" in answer[1]["message"]
        # a probe from the orchestrator still sees the server alive
        assert call(answering(200, b"{}"), headers=headers, path="/ping", limits=limits)[0] == 200


def test_the_allowed_hosts_come_from_the_environment_and_default_to_loopback():
    assert serving_guard.allowed_hosts({}) == serving_guard.LOOPBACK_HOSTS
    assert serving_guard.allowed_hosts({"AETRACK_SERVE_ALLOWED_HOSTS": "a:1, b:*"}) == ("a:1", "b:*")


def test_aetrack_serve_hands_its_allowed_hosts_to_the_model_server(monkeypatch):
    from click.testing import CliRunner

    from aetrack.cli import server as cli_server
    from aetrack.cli.main import main

    started = {}

    class FakeChild:
        def __init__(self, name, command, env, log=None):
            started["env"] = env

    monkeypatch.setattr(cli_server, "Child", FakeChild)
    monkeypatch.setattr(cli_server, "check_port", lambda host, port: None)
    monkeypatch.setattr(cli_server, "describe_model", lambda uri, tracking: uri)
    monkeypatch.setattr(cli_server, "run_until_stopped", lambda *args: None)
    for extra, expected in (([], set()), (["--allowed-host", "gen.example.org:5001"], {"gen.example.org:5001"})):
        result = CliRunner().invoke(main, ["serve", "models:/m@champion", "--port", "5001", *extra])
        assert result.exit_code == 0, result.output
        hosts = set(started["env"][serving_guard.ALLOWED_HOSTS_VARIABLE].split(","))
        assert hosts == {"localhost:*", "127.0.0.1:*", "[[]::1]:*", "127.0.0.1:5001"} | expected
        assert serving_guard.check_host(b"[::1]:5001", tuple(hosts)) is None  # the guard reads them as MLflow would
