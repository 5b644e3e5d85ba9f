"""The control plane's HTTP API: Runpod's serverless job API, management, live events.

Runpod's routes keep their paths and JSON shapes, with the endpoint's name as its id, so
``curl -H "Authorization: Bearer $TOKEN" -d '{"input": {...}}' $URL/v2/NAME/runsync`` works
as it does against api.runpod.ai. Every route but ``GET /ping`` needs the bearer token.
The routes are described once, in ``openapi.py``: the routing table and ``/openapi.json``.

Requests are checked completely at the door, before anything is recorded (docs/rest-api.md,
"Limits"): a body size per route, counted while the body streams in (413); JSON nesting
depth; no NaN, Infinity or numbers that overflow a float (400). Responses never fail on a
value stored earlier: non-finite floats are written as ``null``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import sys
from itertools import accumulate
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse as _StarletteJSONResponse
from starlette.responses import Response, StreamingResponse

from .. import __version__, envvars
from ..config import EndpointConfig
from ..errors import BudgetExceeded, ConfigError
from ..providers.base import PlacementError
from . import model as m
from . import openapi, policy
from .control import ControlPlane, NotFound

RUNSYNC_WAIT = 90.0
MAX_WAIT_MS = 3_600_000  # the longest ?wait= a runsync may ask for (one hour)

# Request limits (docs/rest-api.md, "Limits"). Runpod's are 10 MB for /run and 20 MB for
# /runsync; these are those in MiB, so whatever Runpod accepts is accepted here too.
RUN_BODY_LIMIT = 10 * 1024 * 1024
RUNSYNC_BODY_LIMIT = 20 * 1024 * 1024
SETTINGS_BODY_LIMIT = 1024 * 1024  # PUT /v1/endpoints/{name}, POST .../scale
MAX_BODY_ENV = "FLASH_JUPYTER_MAX_BODY_BYTES"  # one limit for /run and /runsync instead
MAX_JSON_DEPTH = 64  # nesting of objects and arrays in a request body, the body itself is 1
PARSE_IN_THREAD = 1 << 20  # bodies above this are parsed off the event loop


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def job_body_limits() -> tuple[int, int]:
    """Body limits of /run and /runsync: Runpod's, or FLASH_JUPYTER_MAX_BODY_BYTES for both."""
    try:
        n = envvars.get(MAX_BODY_ENV)
    except envvars.EnvVarError as e:
        print(f"flash-jupyter: {e}; ignoring it", file=sys.stderr)
        return RUN_BODY_LIMIT, RUNSYNC_BODY_LIMIT
    if n is None:
        return RUN_BODY_LIMIT, RUNSYNC_BODY_LIMIT
    return n, n


def _size(n: int) -> str:
    return f"{n} bytes ({n / 1048576:.3g} MiB)" if n >= 1048576 else f"{n} bytes"


async def read_body(request: Request, limit: int, hint: str = "") -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit``:
    by its Content-Length first, then by counting as it streams in (chunked or lying
    clients), so no more than ``limit`` bytes are ever held."""

    def too_large(size: str) -> HTTPError:
        path = request.url.path
        return HTTPError(
            413, f"request body too large: {size}; {path} accepts at most {_size(limit)}{hint}"
        )

    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise HTTPError(400, f"Content-Length is not a number: {declared!r}") from None
        if n > limit:
            raise too_large(_size(n))
    chunks: list[bytes] = []
    got = 0
    async for chunk in request.stream():
        got += len(chunk)
        if got > limit:
            raise too_large(f"more than {_size(limit)}")
        chunks.append(chunk)
    return b"".join(chunks)


class _NonFinite(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _NonFinite(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    f = float(text)
    if not math.isfinite(f):
        raise _NonFinite(f"the number {text[:40]} is out of range (it overflows to infinity)")
    return f


_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # as signed bytes: +1, -1
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def too_deep(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON document ``text`` nests objects and arrays more than ``limit`` deep.

    Iterative and on the text, before parsing (json.loads and pickle recurse): strings are
    cut out, only brackets are kept, and the deepest point is the largest running sum of
    +1 per opening and -1 per closing bracket (computed in C by itertools.accumulate).
    Malformed JSON gives some answer; json.loads then refuses it anyway.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    s = text.replace("\\\\", "").replace('\\"', "")  # escapes: left no quote behind
    s = "".join(s.split('"')[::2])  # outside strings only
    b = s.encode("utf-8", "surrogatepass").translate(_STEPS, _NOT_BRACKETS)
    if b"\x01" * (limit + 1) in b:
        return True
    return max(accumulate(memoryview(b).cast("b")), default=0) > limit


def parse_json(raw: bytes) -> Any:
    """A request body as JSON, validated: depth, NaN/Infinity, overflowing numbers."""
    try:
        text = raw.decode(json.detect_encoding(raw), "surrogatepass")
    except (UnicodeDecodeError, LookupError) as e:
        raise HTTPError(400, f"request body is not valid JSON: {e}") from None
    if too_deep(text):
        raise HTTPError(
            400,
            f"request body is nested too deeply: JSON objects and arrays may nest at most "
            f"{MAX_JSON_DEPTH} levels (MAX_JSON_DEPTH)",
        )
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except _NonFinite as e:
        raise HTTPError(
            400, f"request body has a non-finite number: {e}; NaN and Infinity are not allowed"
        ) from None
    except RecursionError:
        raise HTTPError(
            400, f"request body is nested too deeply (more than {MAX_JSON_DEPTH} levels)"
        ) from None
    except ValueError as e:
        raise HTTPError(400, f"request body is not valid JSON: {e}") from None


def _finite_copy(value: Any) -> Any:
    """A copy of ``value`` with every NaN or infinite float replaced by None (dict keys:
    by "NaN", "Infinity" or "-Infinity"). Iterative: any depth json.dumps can write."""
    root: list[Any] = [None]
    stack: list[tuple[Any, Any, Any]] = [(value, root, 0)]
    while stack:
        v, into, key = stack.pop()
        if isinstance(v, float):
            into[key] = v if math.isfinite(v) else None
        elif isinstance(v, dict):
            new = {_finite_key(k): None for k in v}
            into[key] = new
            stack.extend((x, new, _finite_key(k)) for k, x in v.items())
        elif isinstance(v, (list, tuple)):
            new_list: list[Any] = [None] * len(v)
            into[key] = new_list
            stack.extend((x, new_list, i) for i, x in enumerate(v))
        else:
            into[key] = v
    return root[0]


def _finite_key(k: Any) -> Any:
    if isinstance(k, float) and not math.isfinite(k):
        return "NaN" if k != k else ("Infinity" if k > 0 else "-Infinity")
    return k


def render_json(
    content: Any, default: Any = None, separators: tuple[str, str] = (",", ":")
) -> bytes:
    """JSON for a response, whatever was stored: non-finite floats (a handler may return
    them) become null, and strings that are not valid Unicode are written escaped."""
    kw = {"allow_nan": False, "separators": separators, "default": default}
    try:
        return json.dumps(content, ensure_ascii=False, **kw).encode()
    except ValueError:  # a NaN or infinity (or a lone surrogate: UnicodeEncodeError)
        pass
    return json.dumps(_finite_copy(content), **kw).encode()


SSE_SEPARATORS = (", ", ": ")  # events keep json.dumps's default spacing


class JSONResponse(_StarletteJSONResponse):
    def render(self, content: Any) -> bytes:
        return render_json(content)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class BearerAuth:
    """Pure ASGI middleware: 401 without the right ``Authorization: Bearer`` header."""

    OPEN = {"/ping"}

    def __init__(self, app: Any, token: str):
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in self.OPEN:
            auth = b""
            for k, v in scope["headers"]:
                if k == b"authorization":
                    auth = v
                    break
            scheme, _, given = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
                resp = JSONResponse(
                    {"error": "401 Unauthorized: missing or wrong bearer token"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(cp: ControlPlane, token: str, info: dict[str, Any]) -> Any:
    run_limit, runsync_limit = job_body_limits()
    custom = (run_limit, runsync_limit) != (RUN_BODY_LIMIT, RUNSYNC_BODY_LIMIT)
    limit_note = f" (set by {MAX_BODY_ENV})" if custom else ""

    async def body_json(request: Request, limit: int = SETTINGS_BODY_LIMIT, hint: str = "") -> Any:
        raw = await read_body(request, limit, hint)
        if not raw:
            return {}
        if len(raw) > PARSE_IN_THREAD:
            return await asyncio.to_thread(parse_json, raw)
        return parse_json(raw)

    def query_number(request: Request, name: str, default: float, hi: float | None) -> float:
        """A query parameter, checked before anything is queued: a finite number from 0 to
        ``hi`` (milliseconds), or with ``hi`` None a whole number, 0 or more; else 400."""
        raw = request.query_params.get(name)
        if raw is None:
            return default
        try:
            if hi is None:
                n = int(raw)
                if n >= 0:
                    return n
            else:
                v = float(raw)
                if math.isfinite(v) and 0 <= v <= hi:
                    return v
        except ValueError:
            pass
        if hi is None:
            what = "a whole number, 0 or more"
        else:
            what = f"a number of milliseconds from 0 to {hi:.0f}"
        raise HTTPError(400, f"{name} must be {what}, not {raw!r}")

    def query_flag(request: Request, name: str) -> bool:
        """A yes/no query parameter: 1, true, yes or 0, false, no (absent: no); else 400."""
        raw = request.query_params.get(name)
        if raw is None:
            return False
        v = raw.strip().lower()
        if v in ("1", "true", "yes"):
            return True
        if v in ("0", "false", "no", ""):
            return False
        raise HTTPError(400, f"{name} must be 1 or 0 (true or false), not {raw[:40]!r}")

    def guard(fn):
        async def wrapped(request: Request) -> Response:
            try:
                return await fn(request)
            except HTTPError as e:
                return _error(e.status, e.message)
            except NotFound as e:
                return _error(404, str(e.args[0]))
            except BudgetExceeded as e:  # the spending guard: 402 Payment Required
                return _error(402, str(e))
            except (ConfigError, PlacementError, ValueError, TypeError, KeyError) as e:
                return _error(400, str(e))

        return wrapped

    def job_input(body: Any) -> dict[str, Any]:
        """A /run or /runsync body as the job keeps it: its input, and Runpod's ``webhook``
        and ``policy`` in normal form, all checked here (other fields are ignored)."""
        if not isinstance(body, dict) or "input" not in body:
            raise HTTPError(400, 'body must be a JSON object with an "input" field')
        if not isinstance(body["input"], dict):
            raise HTTPError(
                400, '"input" must be a JSON object (the function\'s keyword arguments)'
            )
        job = {"input": body["input"]}
        if len(body) > 1:
            if body.get("webhook") is not None:
                job["webhook"] = cp.webhooks.check(body["webhook"])
            pol = policy.check(body.get("policy"))
            if pol:
                job["policy"] = pol
        return job

    # -- liveness and info
    async def ping(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def get_info(request: Request) -> Response:
        return JSONResponse(
            {
                **info,
                "version": __version__,
                "provider": cp.provider.describe(),
                "storage": cp.store.sizes(),
            }
        )

    async def submit_committed(name: str, body: dict[str, Any]) -> m.Job:
        """Queue a job and return once it is on disk: an answered /run survives a crash."""
        committed = asyncio.get_running_loop().create_future()
        job = cp.submit(name, "json", body, on_commit=lambda: committed.set_result(None))
        await committed
        return job

    # -- Runpod job API
    @guard
    async def run(request: Request) -> Response:
        name = request.path_params["name"]
        cp.endpoint(name)
        cp.budget.check_submit(name)  # before the body is even read
        body = await body_json(request, run_limit, limit_note)
        job = await submit_committed(name, job_input(body))
        # As Runpod answers: accepted into the queue (it may have started since).
        return JSONResponse({"id": job.id, "status": m.IN_QUEUE})

    @guard
    async def runsync(request: Request) -> Response:
        name = request.path_params["name"]
        cp.endpoint(name)
        cp.budget.check_submit(name)
        wait_ms = query_number(request, "wait", RUNSYNC_WAIT * 1000, MAX_WAIT_MS)
        body = await body_json(request, runsync_limit, limit_note)
        job = await submit_committed(name, job_input(body))
        wait = wait_ms / 1000
        if job.status not in m.TERMINAL:
            fut = asyncio.get_running_loop().create_future()
            job.waiters.append(fut)
            try:
                await asyncio.wait_for(asyncio.shield(fut), timeout=wait)
            except asyncio.TimeoutError:
                pass
        return JSONResponse(cp.status_payload(job))

    @guard
    async def status(request: Request) -> Response:
        job = cp.job(request.path_params["job"], request.path_params["name"])
        return JSONResponse(cp.status_payload(job))

    @guard
    async def stream(request: Request) -> Response:
        """Runpod's: the chunks not handed out yet (a cursor per job), then, once the job
        is over and every chunk is out, none and the final status. ``?all=1``: every chunk
        so far, the cursor left where it is."""
        every = query_flag(request, "all")
        job = cp.job(request.path_params["job"], request.path_params["name"])
        chunks = job.stream
        if not every:
            start, job.stream_read = job.stream_read, len(chunks)
            chunks = chunks[start:]
        return JSONResponse({"status": job.status, "stream": [{"output": c} for c in chunks]})

    @guard
    async def cancel(request: Request) -> Response:
        job = cp.job(request.path_params["job"], request.path_params["name"])
        job = cp.cancel(job.id)
        return JSONResponse({"id": job.id, "status": job.status})

    @guard
    async def health(request: Request) -> Response:
        return JSONResponse(cp.health(request.path_params["name"]))

    @guard
    async def purge(request: Request) -> Response:
        n = cp.purge_queue(request.path_params["name"])
        return JSONResponse({"removed": n, "status": "completed"})

    # -- management
    @guard
    async def list_endpoints(request: Request) -> Response:
        return JSONResponse([cp.endpoint_view(ep) for ep in cp.endpoints.values()])

    @guard
    async def get_endpoint(request: Request) -> Response:
        return JSONResponse(cp.endpoint_view(cp.endpoint(request.path_params["name"])))

    @guard
    async def put_endpoint(request: Request) -> Response:
        body = await body_json(request)
        if not isinstance(body, dict):
            raise HTTPError(400, "body must be a JSON object of endpoint settings")
        name = request.path_params["name"]
        if "changes" in body:  # a %%flash cell's rule: only these settings change
            extra = set(body) - {"changes", "serves"}
            if extra:
                raise HTTPError(400, f'with "changes", the body may only add "serves", not '
                                     f"{', '.join(sorted(extra))}")  # fmt: skip
            return JSONResponse(cp.deploy_changes(name, body["changes"], body.get("serves")))
        body["name"] = name
        return JSONResponse(cp.deploy(EndpointConfig.from_dict(body)))

    @guard
    async def warm(request: Request) -> Response:
        name = request.path_params["name"]
        cp.endpoint(name)
        body = await body_json(request)
        if not isinstance(body, dict):
            raise HTTPError(400, 'body must be {"workers": N} (or empty for one worker)')
        return JSONResponse(cp.warm(name, body.get("workers", 1)))

    @guard
    async def get_budget(request: Request) -> Response:
        return JSONResponse(cp.budget.view())

    @guard
    async def put_budget(request: Request) -> Response:
        body = await body_json(request)
        if not isinstance(body, dict) or "limit" not in body or set(body) - {"limit", "endpoint"}:
            raise HTTPError(
                400,
                'body must be {"limit": DOLLARS} (null or "off" clears it), with '
                '"endpoint": NAME for one endpoint\'s limit',
            )
        return JSONResponse(cp.budget.set(body["limit"], body.get("endpoint")))

    @guard
    async def delete_endpoint(request: Request) -> Response:
        cp.delete_endpoint(request.path_params["name"])
        return JSONResponse({"deleted": request.path_params["name"]})

    @guard
    async def scale(request: Request) -> Response:
        body = await body_json(request)
        if not isinstance(body, dict) or "min" not in body or "max" not in body:
            raise HTTPError(400, 'body must be {"min": N, "max": M}')
        return JSONResponse(cp.scale(request.path_params["name"], body["min"], body["max"]))

    @guard
    async def stop(request: Request) -> Response:
        return JSONResponse(cp.stop_endpoint(request.path_params["name"]))

    @guard
    async def logs(request: Request) -> Response:
        ep = cp.endpoint(request.path_params["name"])
        tail = int(query_number(request, "tail", 200, None))
        return JSONResponse(list(ep.logs)[-tail:] if tail > 0 else [])

    @guard
    async def list_jobs(request: Request) -> Response:
        name = request.query_params.get("endpoint")
        limit = int(query_number(request, "limit", 100, None))
        jobs = [j for j in cp.jobs.values() if name is None or j.endpoint == name]
        return JSONResponse(
            [{"endpoint": j.endpoint, **cp.status_payload(j)} for j in jobs[len(jobs) - limit :]]
        )

    @guard
    async def billing(request: Request) -> Response:
        return JSONResponse(cp.billing())

    async def events(request: Request) -> Response:
        q = cp.events.subscribe()

        async def gen():
            try:
                snap = {"type": "snapshot", "endpoints": [cp.endpoint_view(e) for e in
                                                          cp.endpoints.values()],
                        "budget": cp.budget.view()}  # fmt: skip
                yield b"data: " + render_json(snap, separators=SSE_SEPARATORS) + b"\n\n"
                while True:
                    try:
                        ev = await asyncio.wait_for(q.get(), timeout=15)
                        data = render_json(ev, default=str, separators=SSE_SEPARATORS)
                        yield b"data: " + data + b"\n\n"
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"
            finally:
                cp.events.unsubscribe(q)

        return StreamingResponse(
            gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error(404, f"no route {request.method} {request.url.path}")

    async def bad_method(request: Request, exc: Exception) -> Response:
        # RFC 9110: a 405 lists what the path allows (all its routes', not only the first's).
        path = request.scope["path"]
        allowed = sorted({m for r in routes if r.path_regex.match(path) for m in r.methods})
        return JSONResponse(
            {"error": f"method {request.method} not allowed on {request.url.path}"},
            status_code=405,
            headers={"Allow": ", ".join(allowed)},
        )

    schema_body = render_json(openapi.schema(__version__))

    async def openapi_json(request: Request) -> Response:
        return Response(schema_body, media_type="application/json")

    # One description of the routes (server/openapi.py) makes both the routing table and
    # the schema served at /openapi.json.
    handlers = {
        "ping": ping, "openapi": openapi_json, "get_info": get_info, "run": run,
        "runsync": runsync, "status": status, "stream": stream, "cancel": cancel,
        "health": health, "purge": purge, "list_endpoints": list_endpoints,
        "get_endpoint": get_endpoint, "put_endpoint": put_endpoint,
        "delete_endpoint": delete_endpoint, "scale": scale, "warm": warm,
        "get_budget": get_budget, "put_budget": put_budget, "stop": stop, "logs": logs,
        "list_jobs": list_jobs, "billing": billing, "events": events,
    }  # fmt: skip
    routes = openapi.starlette_routes(handlers)
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: bad_method})
    return BearerAuth(app, token)
