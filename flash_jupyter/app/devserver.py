"""``flash-jupyter dev PATH``: a local FastAPI app in front of PATH's endpoints.

Each endpoint gets ``POST /NAME/runsync``, ``POST /NAME/run`` and ``GET /NAME/status/{job_id}``,
the same JSON as the control plane's ``/v2`` routes (``{"input": {...}}`` in, the job's payload
out), with a request model built from the function's signature, so ``/docs`` (Swagger) and
``/openapi.json`` describe them and a wrong input is a 422 before any worker runs. The
endpoints are deployed first (``deploy.register_all``) and every request is relayed to the
control plane over HTTP, so it runs on its workers, exactly as a deployed call would.
``--reload`` watches PATH and redeploys and rebuilds the routes when it changes.
"""

from __future__ import annotations

import ast
import re
import threading
import time
from pathlib import Path
from typing import Any, Literal

from . import deploy as dep

RELOAD_POLL = 0.3  # seconds between looks at PATH's files

# The only names an annotation may use to shape a request model: evaluated from this table,
# never by running the user's text. Anything else becomes Any.
_SAFE: dict[str, Any] = {
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
    "list": list,
    "dict": dict,
    "List": list,
    "Dict": dict,
    "bytes": str,
    "None": type(None),
    "Any": Any,
}


def annotation_type(text: str | None) -> Any:
    """The type an annotation's source text names, from safe literal names only."""
    if not text:
        return Any
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        return Any
    return _eval(node, 0)


def _eval(node: ast.AST, depth: int) -> Any:
    if depth > 5:
        return Any
    if isinstance(node, ast.Constant):
        if node.value is None:
            return type(None)
        if isinstance(node.value, str):  # a string annotation: the same rules inside
            return annotation_type(node.value)
        return Any
    if isinstance(node, ast.Name):
        return _SAFE.get(node.id, Any)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        if node.value.id in ("typing", "t") and node.attr in _SAFE:
            return _SAFE[node.attr]
        return Any
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        left, right = _eval(node.left, depth + 1), _eval(node.right, depth + 1)
        if Any in (left, right):
            return Any
        return left | right
    if isinstance(node, ast.Subscript):
        base = node.value
        base_name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        inner = [_eval(a, depth + 1) for a in args]
        if base_name == "Optional" and len(inner) == 1:
            return Any if inner[0] is Any else inner[0] | None
        if base_name in ("list", "List") and len(inner) == 1:
            return list[inner[0]]
        if base_name in ("dict", "Dict") and len(inner) == 2:
            return dict[inner[0], inner[1]]
        return Any
    return Any


def _model_name(name: str, suffix: str) -> str:
    return "".join(p[:1].upper() + p[1:] for p in re.split(r"[^0-9A-Za-z]+", name) if p) + suffix


def input_model(t: dep.Target) -> Any:
    """The pydantic model of an endpoint's ``input``."""
    from pydantic import ConfigDict, Field, create_model

    f = t.found[0]
    fields: dict[str, Any] = {}
    extra = "forbid"
    if t.kind == "function":
        for p in getattr(f, "params", None) or []:
            kind = str(getattr(p, "kind", "") or "").lower()
            name = getattr(p, "name", "")
            if "var_keyword" in kind or name.startswith("**"):
                extra = "allow"
                continue
            if "var" in kind or name.startswith("*") or "positional_only" in kind:
                continue
            typ = annotation_type(p.annotation)
            if p.default_source is None:  # required
                fields[name] = (typ, Field(..., examples=[dep.example_value(p.annotation)]))
            elif dep.is_missing(p.default):  # a default that is not a literal: the function's
                fields[name] = (typ | None if typ is not Any else Any, None)
            else:
                if p.default is None and typ is not Any:
                    typ = typ | None
                fields[name] = (typ, p.default)
    elif t.kind == "class":
        methods = list(f.methods or {})
        method_type: Any = Literal[tuple(methods)] if methods else str  # type: ignore[misc]
        fields = {
            "method": (method_type | None, Field(None, description=(
                "the method to run; without it, the class's __call__"))),
            "args": (dict[str, Any], Field(default_factory=dict,
                                           description="the method's keyword arguments")),
            "init": (dict[str, Any], Field(default_factory=dict, description=(
                "the constructor's keyword arguments (one instance per worker and init)"))),
        }  # fmt: skip
    elif t.kind == "runpod":  # the keys its handler reads from job["input"], read statically
        extra = "allow"
        for p in getattr(f, "params", None) or []:
            fields[p.name] = (Any, None if dep.is_missing(p.default) else p.default)
    else:  # cells: the names they read are the variables a request gives
        extra = "allow"
        for n in dep.cell_inputs([x.source or "" for x in t.found]):
            fields[n] = (Any, None)
    return create_model(  # type: ignore[call-overload]
        _model_name(t.name, "Input"), __config__=ConfigDict(extra=extra), **fields
    )


def request_model(t: dep.Target) -> Any:
    from pydantic import create_model

    return create_model(_model_name(t.name, "Request"), input=(input_model(t), ...))


class DevApp:
    """The FastAPI app, its routes rebuilt from PATH at each (re)load."""

    def __init__(
        self,
        path: str | Path,
        client: Any,
        echo: Any = print,
        build: bool = True,
        overrides: dict[str, dict[str, Any]] | None = None,
    ):
        import httpx
        from fastapi import FastAPI
        from fastapi.responses import RedirectResponse

        self.path = Path(path)
        self.client = client
        self.echo = echo
        self.build = build
        self.overrides = overrides
        self.app = FastAPI(
            title=f"flash-jupyter dev: {self.path.name}",
            description=f"The endpoints of {self.path}, run on the control plane's workers "
            f"at {client.url}.",
        )
        self.app.add_api_route("/", lambda: RedirectResponse("/docs"), include_in_schema=False)
        self.base_routes = list(self.app.router.routes)
        self.http = httpx.Client(
            base_url=client.url,
            headers={"Authorization": f"Bearer {client.token}"},
            timeout=httpx.Timeout(30, read=None),  # runsync waits as long as the job allows
        )
        self.names: list[str] = []

    def load(self) -> list[dep.Target]:
        """Discover, deploy, and replace the endpoint routes (then the schema is rebuilt)."""
        from fastapi.routing import APIRoute

        plan, _, _ = dep.register_all(
            self.path, self.client, echo=self.echo, build=self.build, overrides=self.overrides
        )
        dep.bring_up(self.client, plan, self.echo, wait=False)
        routes: list[Any] = []
        for t in plan:
            routes += self._routes(t, APIRoute)
        self.app.router.routes = [*self.base_routes, *routes]
        self.app.openapi_schema = None
        self.names = [t.name for t in plan]
        return plan

    def _routes(self, t: dep.Target, route: Any) -> list[Any]:
        model = request_model(t)
        name = t.name
        doc = f"{t.kind} endpoint {name} ({t.where})"

        def runsync(body: Any) -> Any:
            return self.relay("POST", f"/v2/{name}/runsync", _body(body))

        def run(body: Any) -> Any:
            return self.relay("POST", f"/v2/{name}/run", _body(body))

        def status(job_id: str) -> Any:
            return self.relay("GET", f"/v2/{name}/status/{job_id}")

        runsync.__annotations__ = {"body": model}
        run.__annotations__ = {"body": model}
        status.__annotations__ = {"job_id": str}
        tags = [name]
        return [
            route(f"/{name}/runsync", runsync, methods=["POST"], tags=tags,
                  summary=f"run {name} and wait for the result", description=doc,
                  operation_id=f"{name}_runsync"),
            route(f"/{name}/run", run, methods=["POST"], tags=tags,
                  summary=f"queue a job on {name}; its id", description=doc,
                  operation_id=f"{name}_run"),
            route(f"/{name}/status/{{job_id}}", status, methods=["GET"], tags=tags,
                  summary=f"a job of {name}: status and output", operation_id=f"{name}_status"),
        ]  # fmt: skip

    def relay(self, method: str, path: str, body: Any = None) -> Any:
        """The control plane's answer as it is: same status, same JSON."""
        from fastapi.responses import JSONResponse

        r = self.http.request(method, path, json=body)
        try:
            content = r.json()
        except ValueError:
            content = {"error": r.text}
        return JSONResponse(content, status_code=r.status_code)

    def watch(self, stop: threading.Event) -> None:
        """``--reload``: poll PATH's files; on a change, load again (an error keeps the routes
        that were there, and says what to fix)."""
        seen = fingerprint(self.path)
        while not stop.wait(RELOAD_POLL):
            now = fingerprint(self.path)
            if now == seen:
                continue
            seen = now
            self.echo(f"{self.path} changed: reloading")
            try:
                self.load()
                self.echo("reloaded: " + ", ".join(self.names))
            except Exception as e:  # the server stays up with the routes it had
                self.echo(f"reload failed, keeping the previous routes: {e}")


def _body(body: Any) -> dict[str, Any]:
    return {"input": body.input.model_dump(exclude_unset=True)}


def fingerprint(path: Path) -> tuple:
    """What changes when PATH is edited: (file, mtime, size) of each source file."""
    files = [path] if path.is_file() else sorted(path.rglob("*.py"))
    out = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        out.append((str(f), st.st_mtime_ns, st.st_size))
    return tuple(out)


def serve(
    path: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    reload: bool = False,
    build: bool = True,
    echo: Any = print,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Deploy PATH's endpoints and serve the dev app until interrupted."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        from ..errors import ConfigError

        raise ConfigError("`flash-jupyter dev` needs FastAPI: pip install 'flash-jupyter[app]'") \
            from None  # fmt: skip
    from ..client import get_client

    dev = DevApp(path, get_client(), echo=echo, build=build, overrides=overrides)
    dev.load()
    stop = threading.Event()
    if reload:
        threading.Thread(target=dev.watch, args=(stop,), daemon=True, name="reload").start()
    base = f"http://{host}:{port}"
    echo("")
    for n in dev.names:
        echo(f"  POST {base}/{n}/runsync   POST {base}/{n}/run   GET {base}/{n}/status/<id>")
    more = ", reloading on edits" if reload else ""
    echo(f"dev server on {base} (Swagger: {base}/docs){more}")
    t0 = time.monotonic()
    try:
        uvicorn.run(dev.app, host=host, port=port, log_level="warning")
    finally:
        stop.set()
        dev.http.close()
        echo(f"dev server stopped after {time.monotonic() - t0:.0f} s")
