"""The control plane's HTTP API: Runpod's serverless job API, management, live events.

Runpod's routes keep their paths and JSON shapes, with the endpoint's name as its id, so
``curl -H "Authorization: Bearer $TOKEN" -d '{"input": {...}}' $URL/v2/NAME/runsync`` works
as it does against api.runpod.ai. Every route but ``GET /ping`` needs the bearer token.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import __version__
from ..config import EndpointConfig
from ..errors import ConfigError
from ..providers.base import PlacementError
from . import model as m
from .control import ControlPlane, NotFound

RUNSYNC_WAIT = 90.0


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


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
    async def body_json(request: Request) -> Any:
        raw = await request.body()
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except ValueError as e:
            raise HTTPError(400, f"request body is not valid JSON: {e}") from None

    def guard(fn):
        async def wrapped(request: Request) -> Response:
            try:
                return await fn(request)
            except HTTPError as e:
                return _error(e.status, e.message)
            except NotFound as e:
                return _error(404, str(e.args[0]))
            except (ConfigError, PlacementError, ValueError, TypeError, KeyError) as e:
                return _error(400, str(e))

        return wrapped

    def job_input(body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or "input" not in body:
            raise HTTPError(400, 'body must be a JSON object with an "input" field')
        if not isinstance(body["input"], dict):
            raise HTTPError(
                400, '"input" must be a JSON object (the function\'s keyword arguments)'
            )
        return {"input": body["input"]}

    # -- liveness and info
    async def ping(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def get_info(request: Request) -> Response:
        return JSONResponse({**info, "version": __version__, "provider": cp.provider.describe()})

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
        job = await submit_committed(name, job_input(await body_json(request)))
        # As Runpod answers: accepted into the queue (it may have started since).
        return JSONResponse({"id": job.id, "status": m.IN_QUEUE})

    @guard
    async def runsync(request: Request) -> Response:
        name = request.path_params["name"]
        cp.endpoint(name)
        try:
            wait = float(request.query_params.get("wait", RUNSYNC_WAIT * 1000)) / 1000
        except ValueError:
            raise HTTPError(400, "wait must be a number of milliseconds") from None
        job = await submit_committed(name, job_input(await body_json(request)))
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
        job = cp.job(request.path_params["job"], request.path_params["name"])
        chunks = [{"output": c} for c in job.stream]
        return JSONResponse({"status": job.status, "stream": chunks})

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
        body["name"] = request.path_params["name"]
        return JSONResponse(cp.deploy(EndpointConfig.from_dict(body)))

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
        tail = int(request.query_params.get("tail", 200))
        return JSONResponse(list(ep.logs)[-tail:] if tail > 0 else [])

    @guard
    async def list_jobs(request: Request) -> Response:
        name = request.query_params.get("endpoint")
        limit = max(0, int(request.query_params.get("limit", 100)))
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
                                                          cp.endpoints.values()]}  # fmt: skip
                yield f"data: {json.dumps(snap)}\n\n"
                while True:
                    try:
                        ev = await asyncio.wait_for(q.get(), timeout=15)
                        yield f"data: {json.dumps(ev, default=str)}\n\n"
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
        return _error(405, f"method {request.method} not allowed on {request.url.path}")

    routes = [
        Route("/ping", ping),
        Route("/v1/info", get_info),
        Route("/v2/{name}/run", run, methods=["POST"]),
        Route("/v2/{name}/runsync", runsync, methods=["POST"]),
        Route("/v2/{name}/status/{job}", status, methods=["GET", "POST"]),
        Route("/v2/{name}/stream/{job}", stream, methods=["GET", "POST"]),
        Route("/v2/{name}/cancel/{job}", cancel, methods=["POST"]),
        Route("/v2/{name}/health", health, methods=["GET"]),
        Route("/v2/{name}/purge-queue", purge, methods=["POST"]),
        Route("/v1/endpoints", list_endpoints),
        Route("/v1/endpoints/{name}", get_endpoint, methods=["GET"]),
        Route("/v1/endpoints/{name}", put_endpoint, methods=["PUT"]),
        Route("/v1/endpoints/{name}", delete_endpoint, methods=["DELETE"]),
        Route("/v1/endpoints/{name}/scale", scale, methods=["POST"]),
        Route("/v1/endpoints/{name}/stop", stop, methods=["POST"]),
        Route("/v1/endpoints/{name}/logs", logs),
        Route("/v1/jobs", list_jobs),
        Route("/v1/billing", billing),
        Route("/v1/events", events),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: bad_method})
    return BearerAuth(app, token)
