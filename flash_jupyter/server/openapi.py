"""The HTTP API's routes, described once: the app's routing table and its OpenAPI schema.

``ROUTES`` is the one description. ``http_app.build_app`` makes its Starlette routes from it
(``starlette_routes``: each entry names its handler, and a handler without an entry or an
entry without a handler is an error at start), and ``GET /openapi.json`` serves
``schema()``, built from the same entries. So a route cannot exist undocumented, nor be
documented without existing (tests/test_openapi.py checks both against a running control
plane).

``/openapi.json`` needs the bearer token like every route but ``/ping``: liveness stays the
only thing a peer without the token can ask. The schema holds nothing secret (it is this
file), but a public route is one more thing to reason about on a control plane started
with ``--host 0.0.0.0``, and the tools that read a schema (schemathesis, Swagger UI, code
generators) all take an ``Authorization`` header.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import BY_NAME, NAME_RE

OPENAPI_VERSION = "3.0.3"


@dataclass(frozen=True)
class Query:
    name: str
    schema: dict[str, Any]
    description: str


@dataclass(frozen=True)
class Op:
    """One route: a method on a path, its handler (by name), what it takes and answers."""

    method: str
    path: str
    handler: str
    summary: str
    tag: str
    query: tuple[Query, ...] = ()
    body: dict[str, Any] | None = None  # the JSON request body's schema (always optional)
    ok: dict[str, Any] = field(default_factory=lambda: {"type": "object"})
    errors: tuple[int, ...] = ()  # besides 401, which every route but /ping has
    public: bool = False
    media: str = "application/json"  # of the 200 answer

    @property
    def operation_id(self) -> str:
        return f"{self.handler}_{self.method.lower()}"


_NAME = "the endpoint's name (Runpod's endpoint id)"
_SETTINGS_KINDS: dict[str, dict[str, Any]] = {
    "text": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "float_or_none": {"type": "number", "nullable": True},
    "workers": {
        "oneOf": [
            {"type": "integer", "minimum": 1, "maximum": 100},
            {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
            {"type": "string"},
        ]
    },
    "list": {"type": "array", "items": {"type": "string"}},
    "gpus": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    "env": {"type": "object", "additionalProperties": {"type": "string"}},
}


def _settings_schema() -> dict[str, Any]:
    """Endpoint settings, from ``config.SETTINGS`` (what ``EndpointConfig.from_dict`` reads)."""
    props = {
        name: {**_SETTINGS_KINDS[s.kind], "description": s.help}
        for name, s in BY_NAME.items()
        if name != "name"  # the path gives it
    }
    props["workers_min"] = {"type": "integer", "minimum": 0, "maximum": 100,
                            "description": "with workers_max: the range"}  # fmt: skip
    props["workers_max"] = {"type": "integer", "minimum": 1, "maximum": 100,
                            "description": "with workers_min: the range"}  # fmt: skip
    settings = {"type": "object", "properties": props, "additionalProperties": False}
    changes = {  # a %%flash cell's rule: only these settings change
        "type": "object",
        "required": ["changes"],
        "properties": {
            "changes": {  # the decorator's names only (workers as N or [MIN, MAX])
                **settings,
                "properties": {k: v for k, v in props.items() if not k.startswith("workers_")},
                "description": "the settings that change",
            },
            "serves": {  # OpenAPI 3.0: an enum lists null itself, nullable or not
                "type": "string",
                "enum": ["function", "class", "cells", None],
                "nullable": True,
            },
        },
        "additionalProperties": False,
    }
    return {"oneOf": [settings, changes]}


_JOB_BODY = {
    "type": "object",
    "required": ["input"],
    "properties": {
        "input": {"type": "object", "description": "the handler's keyword arguments"},
        "webhook": {
            "type": "string",
            "nullable": True,
            "maxLength": 2048,
            "pattern": "^[Hh][Tt][Tt][Pp][Ss]?://[!-\\[\\]-~]+$",  # printable, no \\
            "description": "an http:// or https:// URL: the final status is POSTed to it",
        },
        "policy": {
            "type": "object",
            "nullable": True,
            "properties": {
                "executionTimeout": {"type": "integer", "minimum": 5000, "maximum": 604800000},
                "ttl": {"type": "integer", "minimum": 10000, "maximum": 604800000},
                "lowPriority": {"type": "boolean"},
            },
            "additionalProperties": False,
        },
    },
}
_JOB = {"$ref": "#/components/schemas/JobStatus"}
_ENDPOINT = {"$ref": "#/components/schemas/Endpoint"}
_WHOLE = {"type": "integer", "minimum": 0}
_FLAG = {"type": "string", "enum": ["1", "0", "true", "false", "yes", "no"]}
_BODY_ERRORS = (400, 413)

ROUTES: tuple[Op, ...] = (
    Op("GET", "/ping", "ping", "liveness: the one route without a token", "info",
       ok={"type": "object", "properties": {"status": {"type": "string"}}}, public=True),
    Op("GET", "/openapi.json", "openapi", "this schema (OpenAPI 3)", "info"),
    Op("GET", "/v1/info", "get_info", "wire port, spool, provider, storage sizes", "info"),
    Op("POST", "/v2/{name}/run", "run", "queue a job", "jobs", body=_JOB_BODY,
       ok={"type": "object", "properties": {"id": {"type": "string"},
                                            "status": {"type": "string"}}},
       errors=(*_BODY_ERRORS, 402, 404)),
    Op("POST", "/v2/{name}/runsync", "runsync", "queue a job and wait for it", "jobs",
       body=_JOB_BODY, ok=_JOB, errors=(*_BODY_ERRORS, 402, 404),
       query=(Query("wait", {"type": "number", "minimum": 0, "maximum": 3600000},
                    "milliseconds to wait (default 90000)"),)),
    Op("GET", "/v2/{name}/status/{job}", "status", "a job's status payload", "jobs", ok=_JOB,
       errors=(404,)),
    Op("POST", "/v2/{name}/status/{job}", "status", "a job's status payload", "jobs", ok=_JOB,
       errors=(404,)),
    Op("GET", "/v2/{name}/stream/{job}", "stream", "a generator's chunks not fetched yet",
       "jobs", query=(Query("all", _FLAG, "every chunk so far, the cursor left alone"),),
       errors=(400, 404)),
    Op("POST", "/v2/{name}/stream/{job}", "stream", "a generator's chunks not fetched yet",
       "jobs", query=(Query("all", _FLAG, "every chunk so far, the cursor left alone"),),
       errors=(400, 404)),
    Op("POST", "/v2/{name}/cancel/{job}", "cancel", "cancel a job", "jobs", errors=(404,)),
    Op("GET", "/v2/{name}/health", "health", "worker and job counts", "jobs", errors=(404,)),
    Op("POST", "/v2/{name}/purge-queue", "purge", "cancel every queued job", "jobs",
       errors=(404,)),
    Op("GET", "/v1/endpoints", "list_endpoints", "every endpoint", "endpoints",
       ok={"type": "array", "items": _ENDPOINT}),
    Op("GET", "/v1/endpoints/{name}", "get_endpoint", "one endpoint", "endpoints",
       ok=_ENDPOINT, errors=(404,)),
    Op("PUT", "/v1/endpoints/{name}", "put_endpoint", "create or update an endpoint",
       "endpoints", body=_settings_schema(), ok=_ENDPOINT, errors=_BODY_ERRORS),
    Op("DELETE", "/v1/endpoints/{name}", "delete_endpoint", "delete an endpoint", "endpoints",
       errors=(404,)),
    Op("POST", "/v1/endpoints/{name}/scale", "scale", "set the worker range", "endpoints",
       body={"type": "object", "required": ["min", "max"],
             "properties": {"min": {**_WHOLE, "maximum": 100},
                            "max": {"type": "integer", "minimum": 1, "maximum": 100}}},
       ok=_ENDPOINT, errors=(*_BODY_ERRORS, 404)),
    Op("POST", "/v1/endpoints/{name}/warm", "warm", "start workers without a job",
       "endpoints", body={"type": "object", "properties": {"workers": _WHOLE}},
       errors=(*_BODY_ERRORS, 402, 404)),
    Op("POST", "/v1/endpoints/{name}/stop", "stop", "scale to zero now", "endpoints",
       errors=(404,)),
    Op("GET", "/v1/endpoints/{name}/logs", "logs", "the endpoint's recent output",
       "endpoints", query=(Query("tail", _WHOLE, "how many lines (default 200)"),),
       ok={"type": "array"}, errors=(400, 404)),
    Op("GET", "/v1/budget", "get_budget", "the spending guard", "budget"),
    Op("PUT", "/v1/budget", "put_budget", "set or clear a spending limit", "budget",
       body={"type": "object", "required": ["limit"],
             "properties": {"limit": {"nullable": True, "oneOf": [
                 {"type": "number", "minimum": 0}, {"type": "string", "enum": ["off"]}]},
                 "endpoint": {"type": "string", "nullable": True}},
             "additionalProperties": False},
       errors=(*_BODY_ERRORS, 404)),
    Op("GET", "/v1/jobs", "list_jobs", "recent jobs", "jobs",
       query=(Query("endpoint", {"type": "string"}, "only this endpoint's"),
              Query("limit", _WHOLE, "how many (default 100)")),
       ok={"type": "array"}, errors=(400,)),
    Op("GET", "/v1/billing", "billing", "costs, per worker and endpoint", "budget"),
    Op("GET", "/v1/events", "events", "live events (Server-Sent Events, never ends)", "events",
       media="text/event-stream", ok={"type": "string"}),
)  # fmt: skip


_REASONS = {
    400: "bad request: malformed JSON, a missing or ill-typed field, a bad query value",
    401: "missing or wrong bearer token",
    402: "the budget is reached",
    404: "unknown endpoint or job",
    413: "request body over the route's size limit",
}


def _path_params(path: str) -> list[dict[str, Any]]:
    out = []
    for part in path.split("/"):
        if part.startswith("{"):
            name = part[1:-1]
            schema = (
                {"type": "string", "pattern": NAME_RE.pattern}
                if name == "name"
                else {"type": "string"}
            )
            out.append({"name": name, "in": "path", "required": True, "schema": schema,
                        "description": _NAME if name == "name" else "the job's id"})  # fmt: skip
    return out


def _operation(op: Op) -> dict[str, Any]:
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    responses: dict[str, Any] = {
        "200": {"description": "OK", "content": {op.media: {"schema": op.ok}}}
    }
    for code in sorted({*op.errors, *(() if op.public else (401,))}):
        responses[str(code)] = {"description": _REASONS[code], "content": error}
    out: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": [op.tag],
        "responses": responses,
    }
    params = _path_params(op.path) + [
        {
            "name": q.name,
            "in": "query",
            "required": False,
            "schema": q.schema,
            "description": q.description,
        }
        for q in op.query
    ]
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {
            "required": bool(op.body.get("required")),  # else an empty body is {}
            "content": {"application/json": {"schema": op.body}},
        }
    if op.public:
        out["security"] = []
    return out


def schema(version: str = "") -> dict[str, Any]:
    """The OpenAPI 3 document of ``ROUTES``."""
    paths: dict[str, dict[str, Any]] = {}
    for op in ROUTES:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "flash-jupyter control plane",
            "version": version or "0",
            "description": "Runpod's serverless job API (/v2, the endpoint's name as its id) "
            "and management (/v1). See docs/rest-api.md.",
        },
        "paths": paths,
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}},
                },
                "JobStatus": {
                    "type": "object",
                    "required": ["id", "status"],
                    "properties": {"id": {"type": "string"}, "status": {"type": "string"}},
                },
                "Endpoint": {"type": "object"},
            },
        },
    }


def starlette_routes(handlers: dict[str, Any]) -> list[Any]:
    """The Starlette routes of ``ROUTES``, each to ``handlers[op.handler]``. Every handler
    must be described, and every description must have its handler."""
    from starlette.routing import Route

    named = {op.handler for op in ROUTES}
    if named != set(handlers):
        raise RuntimeError(
            f"routes and handlers differ: undescribed {sorted(set(handlers) - named)}, "
            f"without a handler {sorted(named - set(handlers))}"
        )
    by_path: dict[str, list[Op]] = {}
    for op in ROUTES:
        by_path.setdefault(op.path, []).append(op)
    routes = []
    for path, ops in by_path.items():
        by_handler: dict[str, list[str]] = {}
        for op in ops:
            by_handler.setdefault(op.handler, []).append(op.method)
        for handler, methods in by_handler.items():
            routes.append(Route(path, handlers[handler], methods=methods))
    return routes
