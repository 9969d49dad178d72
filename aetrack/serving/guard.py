"""What every request to a served aetrack model passes before MLflow reads it, and the one-line
error every refused request gets.

`mlflow models serve` runs `uvicorn mlflow.pyfunc.scoring_server.app:app`, and that module loads the
model while it builds `app`. Loading an aetrack model calls `install()`, which gives the module an
`app` property (Python's documented way to customise a module's attributes), so uvicorn gets MLflow's
app wrapped in `RequestGuard`. The serve command stays as it is; in any other process
(`mlflow.pyfunc.load_model`, `aetrack generate`) `install()` does nothing.

RequestGuard, in front of MLflow:
  - a Host header that AETRACK_SERVE_ALLOWED_HOSTS does not list gets 403 (by default loopback names
    only, as `mlflow server` has it; `aetrack serve` sets the list): a web page cannot reach the model
    through DNS rebinding;
  - a body over AETRACK_SERVE_MAX_BODY (default 8M) gets 413: at once when Content-Length declares
    it, else as soon as the bytes read pass the limit; what follows is never kept;
  - POST /invocations takes application/json in UTF-8 only (415 otherwise: MLflow crashes on a
    missing Content-Type and sends its stack trace for a bad CSV);
  - its body must be a JSON object with exactly one of MLflow's input keys, whose table has at most
    `max_rows` rows of MAX_FIELDS fields, with at most MAX_CONTAINERS arrays and objects nested at
    most MAX_DEPTH deep (400 otherwise). MLflow answers deep nesting and numbers of over 4300 digits
    with 500, and parsing a body of 8 MB spends seconds and a gigabyte on millions of small rows or
    lists, so those are counted before anything is parsed;
  - every answer of 400 or more, from MLflow or from the model, leaves as
    {"error_code": ..., "message": <one line>}: no stack trace, no echo of the input.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import sys
import types
from dataclasses import dataclass
from http import HTTPStatus

from mlflow.pyfunc.scoring_server import SUPPORTED_FORMATS

MAX_BODY_VARIABLE = "AETRACK_SERVE_MAX_BODY"
ALLOWED_HOSTS_VARIABLE = "AETRACK_SERVE_ALLOWED_HOSTS"  # comma-separated Host values, `*` a wildcard; * for any
HEALTH_PATHS = ("/ping", "/health")  # answered whatever the Host, as `mlflow server` answers /health
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]", "localhost:*", "127.0.0.1:*", "[::1]:*")  # no remote DNS rebinds these
DEFAULT_MAX_BODY = "8M"      # 1024 PNGs of CIFAR-10's size, or of MNIST's as pixel lists of 4 decimals
MAX_CONTAINERS = 1 << 16     # arrays and objects: 1024 rows of MNIST pixels nested [1][28][28] take about 32,000
MAX_DEPTH = 32               # aetrack's requests nest 7 deep at most ({"dataframe_split": {"data": [[[[[...
MAX_FIELDS = 16              # per row: aetrack reads 5, MLflow drops the others
MAX_MESSAGE = 400            # characters of an error message
THREAD_FROM = 1 << 18        # bodies from this size are parsed off the event loop
SCORING_APP_MODULE = "mlflow.pyfunc.scoring_server.app"  # what `mlflow models serve` gives uvicorn
FORMATS = ", ".join(sorted(SUPPORTED_FORMATS))

logger = logging.getLogger(__name__)


# ----- wiring into `mlflow models serve` --------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    max_body: int   # bytes
    max_rows: int   # rows of the request's table
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS


class ServedAppModule(types.ModuleType):
    """MLflow's scoring-app module, whose `app` reads as the guarded app."""

    aetrack_limits: Limits

    @property
    def app(self):
        try:
            return guarded(self.__dict__["app"], self.aetrack_limits)
        except KeyError:
            raise AttributeError("app") from None


@functools.cache
def guarded(app, limits: Limits) -> RequestGuard:
    return RequestGuard(app, limits)


def install(max_rows: int) -> bool:
    """Guard MLflow's scoring app if this process is building it; True if it did."""
    module = sys.modules.get(SCORING_APP_MODULE)
    if module is None:
        return False
    module.__class__ = ServedAppModule
    module.aetrack_limits = Limits(max_body_bytes(), max_rows, allowed_hosts())  # a bad setting stops the server here
    logger.info("aetrack: requests checked before MLflow reads them, %s", module.aetrack_limits)
    return True


def max_body_bytes(environ=os.environ) -> int:
    """The body limit in bytes from AETRACK_SERVE_MAX_BODY: a whole number of bytes, or with K, M or G (powers of 1024)."""
    text = environ.get(MAX_BODY_VARIABLE, "").strip() or DEFAULT_MAX_BODY
    match = re.fullmatch(r"(\d+)\s*([kmg]?)(?:i?b)?", text.lower())
    if not match or int(match[1]) == 0:
        raise ValueError(f"{MAX_BODY_VARIABLE}: expected a size such as 16M, 512K or 1048576, got {text!r}")
    return int(match[1]) << {"": 0, "k": 10, "m": 20, "g": 30}[match[2]]


def allowed_hosts(environ=os.environ) -> tuple[str, ...]:
    """The Host values served, from AETRACK_SERVE_ALLOWED_HOSTS; loopback names when it is unset."""
    names = tuple(name.strip() for name in environ.get(ALLOWED_HOSTS_VARIABLE, "").split(",") if name.strip())
    return names or LOOPBACK_HOSTS


def first_headers(raw) -> dict[bytes, bytes]:
    """Header names to values, the first of a repeated header winning, as Starlette's `Request.headers.get` (what
    MLflow reads) has it: a second Content-Type must not be the one checked while MLflow reads the first."""
    headers: dict[bytes, bytes] = {}
    for name, value in raw:
        headers.setdefault(name.lower(), value)
    return headers


def host_matches(host: str, pattern: str) -> bool:
    """`*` matches anything; every other character, `[` included, only itself (MLflow's fnmatch reads `[::1]:*` as a
    character class, which no IPv6 Host matches). `[[]`, the literal `[` that `mlflow server --allowed-hosts` needs
    (and `aetrack serve` is handed with `aetrack server`'s list), is a `[` here too: one list serves both."""
    pattern = pattern.replace("[[]", "[")
    return re.fullmatch(".*".join(map(re.escape, pattern.split("*"))), host) is not None


def check_host(value: bytes | None, allowed: tuple[str, ...]) -> None:
    """As `mlflow server --allowed-hosts` (mlflow.server.security_utils.is_allowed_host_header, whose module would cost
    the first request two seconds of imports) but for `[`: a listed Host or pattern; `*` alone allows any; no Host
    is refused."""
    host = None if value is None else value.decode("latin-1")
    if not host or not any(host_matches(host, name) for name in allowed):
        raise Refused(403, f"Host: {shown(host)} is not served here (allowed: {', '.join(allowed)}; {ALLOWED_HOSTS_VARIABLE})")


# ----- the guard --------------------------------------------------------------------------------

class Refused(Exception):
    """A request answered here, without reaching MLflow."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class RequestGuard:
    """ASGI middleware: body limit, request checks, one-line errors (see the module's docstring)."""

    def __init__(self, app, limits: Limits):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        errors = OneLineErrors(send)
        try:
            headers = first_headers(scope["headers"])
            if scope["path"] not in HEALTH_PATHS:  # probes from a container's orchestrator use its address
                check_host(headers.get(b"host"), self.limits.allowed_hosts)
            self.check_length(headers.get(b"content-length"))
            if scope["method"] == "POST" and scope["path"] == "/invocations":
                check_content_type(headers.get(b"content-type"))
                body = await self.read_body(receive)
                if body is None:
                    return  # the client went away
                if len(body) >= THREAD_FROM:
                    await asyncio.to_thread(check_body, body, self.limits.max_rows)
                else:
                    check_body(body, self.limits.max_rows)
                receive = replay(body, receive)
            await self.app(scope, receive, errors.send)
        except Refused as refusal:
            await respond(send, refusal.status, refusal.message)
        except Exception as err:
            if not errors.started:  # MLflow let an exception out: one line here, the traceback in the log
                await respond(send, 500, f"internal error: {type(err).__name__}")
            raise

    def check_length(self, declared: bytes | None) -> None:
        if declared is not None and declared.isdigit() and int(declared) > self.limits.max_body:
            raise Refused(413, f"body: {int(declared)} bytes, more than the limit of {self.limits.max_body} ({MAX_BODY_VARIABLE})")

    async def read_body(self, receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_body:
                raise Refused(413, f"body: more than the limit of {self.limits.max_body} bytes ({MAX_BODY_VARIABLE})")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def replay(body: bytes, receive):
    """A `receive` that hands MLflow the body already read, then passes on what the client sends next."""
    sent = False

    async def receive_again():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive_again


# ----- the checks -------------------------------------------------------------------------------

def check_content_type(value: bytes | None) -> None:
    """application/json, with charset=utf-8 or nothing: what MLflow's scoring server accepts as JSON."""
    if value is None:
        raise Refused(415, "Content-Type: missing; send application/json")
    mime, *parameters = [part.strip() for part in value.decode("latin-1").split(";")]
    if mime != "application/json":
        raise Refused(415, f"Content-Type: expected application/json, got {shown(mime)}")
    for parameter in parameters:
        name, _, setting = parameter.partition("=")
        if name != "charset" or setting.lower() != "utf-8":
            raise Refused(415, f"Content-Type: the only parameter allowed is charset=utf-8, got {shown(parameter)}")


def check_body(body: bytes, max_rows: int) -> None:
    """A UTF-8 JSON object with exactly one of MLflow's input keys, params an object, a table of at
    most `max_rows` rows of MAX_FIELDS fields, at most MAX_CONTAINERS arrays and objects, MAX_DEPTH deep."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise Refused(400, f"body: not UTF-8 (byte {err.start})") from None
    # Each array or object costs 50-200 bytes once parsed, 20-70 times its text: counted first (an
    # upper bound: brackets inside strings count too, and aetrack's strings are base64, without any).
    if (containers := body.count(b"[") + body.count(b"{")) > MAX_CONTAINERS:
        raise Refused(400, f"body: more than {MAX_CONTAINERS} arrays and objects ({containers})")
    try:
        document = json.loads(text)
    except RecursionError:
        raise Refused(400, f"body: JSON nested more than {MAX_DEPTH} deep") from None
    except json.JSONDecodeError as err:
        raise Refused(400, f"body: not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except ValueError:  # the only other one: an integer literal over Python's digit limit
        raise Refused(400, f"body: a number has more than {sys.get_int_max_str_digits()} digits") from None
    if nesting_depth(body) > MAX_DEPTH:
        raise Refused(400, f"body: JSON nested more than {MAX_DEPTH} deep")
    if not isinstance(document, dict):
        raise Refused(400, f"body: expected a JSON object with one of the keys {FORMATS}, got {json_type(document)}")
    given = [key for key in document if key in SUPPORTED_FORMATS]
    if len(given) != 1:
        raise Refused(400, f"body: give exactly one of the keys {FORMATS} (got {', '.join(given) or 'none'})")
    if not isinstance(document.get("params", {}), (dict, type(None))):
        raise Refused(400, f"params: expected a JSON object, got {json_type(document['params'])}")
    form, table = given[0], document[given[0]]
    if (rows := table_rows(form, table)) > max_rows:  # before any loop over the rows
        raise Refused(400, f"{form}: at most {max_rows} rows, got {rows}")
    if (fields := table_fields(form, table)) > MAX_FIELDS:
        raise Refused(400, f"{form}: at most {MAX_FIELDS} fields per row, got {fields}")


# The table MLflow makes of each input form: records (a list of rows) or columns (an object of
# lists); dataframe_split gives data (rows), columns and index. Anything else MLflow refuses itself.

def table_rows(form: str, table) -> int:
    if form == "dataframe_split" and isinstance(table, dict):
        return max(size(table.get("data")), size(table.get("index")))
    if isinstance(table, dict):
        return max(map(size, table.values()), default=0)
    return size(table)


def table_fields(form: str, table) -> int:
    if isinstance(table, dict) and form != "dataframe_split":
        return len(table)
    rows, widths = table, [1]
    if form == "dataframe_split" and isinstance(table, dict):
        rows, widths = table.get("data"), [size(table.get("columns"))]
    if isinstance(rows, list):
        widths += [size(row) for row in rows]
    return max(widths)


def size(value) -> int:
    return len(value) if isinstance(value, (list, dict)) else 1


SQUARE_BRACKETS = bytes.maketrans(b"{}", b"[]")
NOT_STRUCTURE = bytes(set(range(256)) - set(b'"[]{}'))
QUOTED = re.compile(rb'"[^"]*"')


def nesting_depth(valid_json: bytes) -> int:
    """How deep arrays and objects nest (MAX_DEPTH + 1 for anything deeper), in passes at C speed:
    keep brackets and quotes, drop strings, then remove the innermost pairs once per level."""
    skeleton = valid_json.replace(b"\\\\", b"").replace(b'\\"', b"")  # escapes (only strings hold them) go in pairs
    skeleton = skeleton.translate(SQUARE_BRACKETS, NOT_STRUCTURE)
    skeleton = QUOTED.sub(b"", skeleton.replace(b'""', b""))  # what is left are strings holding brackets: few
    depth = 0
    while skeleton and depth <= MAX_DEPTH:
        skeleton = skeleton.replace(b"[]", b"")
        depth += 1
    return depth


def json_type(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def shown(value, limit: int = 40) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ----- the answer -------------------------------------------------------------------------------

async def respond(send, status: int, message: str, code: str | None = None) -> None:
    body = json.dumps({"error_code": code or status_name(status), "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class OneLineErrors:
    """Wraps `send`: answers below 400 pass as they are; the others are rewritten to one line."""

    def __init__(self, send):
        self.downstream, self.started = send, False
        self.status, self.chunks = None, None

    async def send(self, message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            if message["status"] < 400:
                await self.downstream(message)
            else:
                self.status, self.chunks = message["status"], []
        elif message["type"] == "http.response.body" and self.chunks is not None:
            self.chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                code, text = one_line(self.status, b"".join(self.chunks))
                await respond(self.downstream, self.status, text, code)
        else:
            await self.downstream(message)


def one_line(status: int, body: bytes) -> tuple[str, str]:
    """(error code, one-line message) from an error answer of MLflow's app, JSON or plain text."""
    try:
        payload = json.loads(body)
        code, message = payload.get("error_code") or status_name(status), payload.get("message", payload.get("detail"))
        if not isinstance(message, str):
            raise TypeError
    except (ValueError, TypeError, AttributeError):
        code, message = status_name(status), body.decode("utf-8", "replace")
    return str(code), readable(message)


INVALID_PARAM = re.compile(r"""\('(\w+)', "Failed to validate type and shape for '\w+': .*?, error: (.*?)"\)""")


def readable(message: str) -> str:
    """MLflow's message without its echo of the input and any stack trace, on one line."""
    # "Failed to predict data '<the input>'. \nError: <why>" and, inside it,
    # "Failed to enforce schema of data '<the input>' with schema '<schema>'. Error: <why>"
    if message.startswith("Failed to predict data '") and ". \nError: " in message:
        message = message.split(". \nError: ", 1)[1]
    if message.startswith("Failed to enforce schema of data '") and "'. Error: " in message:
        message = "input: MLflow cannot read it as a table of the model's fields: " + message.rsplit("'. Error: ", 1)[1]
    # Invalid parameters found: {('seed', "Failed to validate type and shape for 'seed': long (default: None), error: <why>")}
    if params := INVALID_PARAM.findall(message):
        message = "; ".join(f"params: {name}: {why}" for name, why in params)
    message = " ".join(message.split("Traceback (most recent call last)")[0].split())
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE - 3] + "..."


def status_name(status: int) -> str:
    try:
        return HTTPStatus(status).name
    except ValueError:
        return "ERROR"
