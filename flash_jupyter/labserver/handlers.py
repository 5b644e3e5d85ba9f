"""The routes under ``/flash-jupyter/api``: one handler per resource, all under Jupyter's
authentication and authorization, relaying the control plane (``relay.Relay``).

JSON in and out. A bad body is a 400 with a message, checked before anything is sent on;
the control plane's errors keep their status and message; with no control plane every
route but ``/status`` and ``/start`` answers 503 ``{"error": "no control plane is running",
"running": false, "message": ...}``; anything unexpected is a 500 with a JSON message (its
traceback, scrubbed, goes to the Jupyter server's log). Nothing sent to the browser or
logged carries the token.

Bodies are read only after Jupyter's checks (host, authentication, XSRF, origin) and only
up to ``MAX_BODY`` bytes (413 past it), so no request makes this server hold or parse more.
The events socket drops a browser that stops reading once ``MAX_UNSENT`` characters wait
for it (close code 1013; the sidebar reconnects and starts again from a snapshot).
"""

from __future__ import annotations

import json
import math
from typing import Any

from jupyter_core.utils import ensure_async
from jupyter_server.auth.decorator import authorized, ws_authenticated
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.base.websocket import WebSocketMixin
from jupyter_server.utils import url_path_join
from tornado import web, websocket
from tornado.concurrent import Future

from ..config import NAME_RE, EndpointConfig
from ..errors import ConfigError
from ..magic_line import LineError, endpoint_for
from .events import EventHub
from .relay import NOT_RUNNING, NotRunning, Relay, RelayError

API = "flash-jupyter/api"
AUTH_RESOURCE = "flash_jupyter"
SETTINGS_KEY = "flash_jupyter"
MAX_WORKERS = 100
MAX_BODY = 64 * 1024  # bytes: the largest body any route takes (a %%flash line, a budget)
MAX_UNSENT = 8 * 1024 * 1024  # characters queued for one events socket before it is dropped


class BadRequest(Exception):
    pass


class TooLarge(BadRequest):
    pass


def _too_large(size: str) -> str:
    return f"request body too large: {size}; flash-jupyter's routes take at most {MAX_BODY} bytes"


@web.stream_request_body
class FlashHandler(APIHandler):
    """What every route shares: the relay, JSON bodies (bounded) and answers, error mapping."""

    auth_resource = AUTH_RESOURCE
    _chunks: bytearray
    _too_large = False

    async def prepare(self) -> None:
        """Jupyter's checks first (a request refused there is never read); then the body's
        bound: a declared size past it is refused now, a streamed one as it passes it."""
        await super().prepare()
        self._chunks = bytearray()
        declared = self.request.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > MAX_BODY:
            self._too_large = True
            self.reply({"error": _too_large(f"{int(declared)} bytes")}, 413)
            return
        connection = self.request.connection
        if hasattr(connection, "set_max_body_size"):  # chunked past 4x the bound: cut off
            connection.set_max_body_size(4 * MAX_BODY)

    def data_received(self, chunk: bytes) -> None:
        if len(self._chunks) + len(chunk) > MAX_BODY:
            self._too_large = True
            self._chunks = bytearray()
        elif not self._too_large:
            self._chunks += chunk

    @property
    def relay(self) -> Relay:
        return self.settings[SETTINGS_KEY]["relay"]

    @property
    def hub(self) -> EventHub:
        return self.settings[SETTINGS_KEY]["hub"]

    def reply(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(self.relay.scrub(json.dumps(body)))

    def body(self, required: bool = True) -> dict[str, Any]:
        """The request's JSON object ({} for an empty body when not ``required``)."""
        if self._too_large:
            raise TooLarge(_too_large(f"more than {MAX_BODY} bytes"))
        raw = bytes(self._chunks)
        if not raw:
            if required:
                raise BadRequest("the request needs a JSON object body")
            return {}
        try:
            body = json.loads(raw)
        except ValueError:
            raise BadRequest("the body is not valid JSON") from None
        except RecursionError:
            raise BadRequest("the body is nested too deeply to be a request") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    async def run(self, work: Any) -> None:
        """Answer with what the coroutine ``work`` returns, mapping every known failure."""
        try:
            self.reply(await work)
        except TooLarge as e:
            self.reply({"error": str(e)}, 413)
        except BadRequest as e:
            self.reply({"error": str(e)}, 400)
        except NotRunning as e:
            self.reply({"error": NOT_RUNNING, "running": False, "message": e.message}, 503)
        except RelayError as e:
            self.reply({"error": e.message}, e.status)
        except Exception as e:  # never Jupyter's bare 500, never an unscrubbed traceback
            self.relay.log_error(f"{self.request.method} {self.request.path}", e)
            self.reply({"error": f"the flash-jupyter server extension failed "
                                 f"({type(e).__name__}); see the Jupyter server's log"},
                       500)  # fmt: skip

    async def relayed(self, method: str, path: str, body: Any = None) -> None:
        await self.run(self.relay.request(method, path, body))


def endpoint_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise BadRequest(
            f"endpoint name {name!r} is not valid: use 1-64 letters, digits, '_', '-', '.'"
        )
    return name


def whole(body: dict[str, Any], key: str, lo: int, hi: int, default: int | None = None) -> int:
    """``body[key]`` as a whole number from ``lo`` to ``hi`` (``default`` when absent)."""
    v = body.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise BadRequest(f'"{key}" must be a whole number from {lo} to {hi}, not {v!r}')
    return v


def _amount(v: Any) -> bool:
    """A finite number, 0 or more (a whole number too big for a float is not)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v) and v >= 0
    except OverflowError:
        return False


def only(body: dict[str, Any], keys: tuple[str, ...]) -> None:
    extra = sorted(set(body) - set(keys))
    if extra:
        raise BadRequest(f"unknown field(s) {', '.join(extra)}; known: {', '.join(keys)}")


class StatusHandler(FlashHandler):
    """``GET /status``: whether a control plane answers, where, and what to do if not."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        await self.run(self.relay.status())


class StartHandler(FlashHandler):
    """``POST /start``: start the machine-local control plane (as a kernel's first call
    would); the status after."""

    @web.authenticated
    @authorized
    async def post(self) -> None:
        async def start() -> dict[str, Any]:
            status = await self.relay.start()
            self.hub.kick()
            return status

        await self.run(start())


class EndpointsHandler(FlashHandler):
    """``GET /endpoints``: every endpoint of the control plane (whoever made it)."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        await self.relayed("GET", "/v1/endpoints")


class EndpointHandler(FlashHandler):
    """``GET|DELETE /endpoints/{name}``."""

    @web.authenticated
    @authorized
    async def get(self, name: str) -> None:
        await self.run(self._call("GET", name))

    @web.authenticated
    @authorized
    async def delete(self, name: str) -> None:
        await self.run(self._call("DELETE", name))

    async def _call(self, method: str, name: str) -> Any:
        return await self.relay.request(method, f"/v1/endpoints/{endpoint_name(name)}")


class EndpointActionHandler(FlashHandler):
    """``POST /endpoints/{name}/warm|scale|stop|purge``."""

    @web.authenticated
    @authorized
    async def post(self, name: str, action: str) -> None:
        await self.run(self._act(name, action))

    async def _act(self, name: str, action: str) -> Any:
        name = endpoint_name(name)
        if action == "warm":
            body = self.body(required=False)
            only(body, ("workers",))
            n = whole(body, "workers", 1, MAX_WORKERS, default=1)
            return await self.relay.request("POST", f"/v1/endpoints/{name}/warm", {"workers": n})
        if action == "scale":
            body = self.body()
            only(body, ("min", "max"))
            wmin = whole(body, "min", 0, MAX_WORKERS)
            wmax = whole(body, "max", 1, MAX_WORKERS)
            if wmin > wmax:
                raise BadRequest(f'"min" ({wmin}) must not exceed "max" ({wmax})')
            return await self.relay.request(
                "POST", f"/v1/endpoints/{name}/scale", {"min": wmin, "max": wmax}
            )
        if action == "stop":
            return await self.relay.request("POST", f"/v1/endpoints/{name}/stop")
        return await self.relay.request("POST", f"/v2/{name}/purge-queue")  # purge


class BudgetHandler(FlashHandler):
    """``GET|PUT /budget``: the control plane's spending guard (``{"limit": USD|null|"off",
    "endpoint"?: name}``)."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        await self.relayed("GET", "/v1/budget")

    @web.authenticated
    @authorized
    async def put(self) -> None:
        await self.run(self._put())

    async def _put(self) -> Any:
        body = self.body()
        only(body, ("limit", "endpoint"))
        if "limit" not in body:
            raise BadRequest('the body needs "limit": an amount in USD, or null or "off"')
        limit = body["limit"]
        if limit == "off":
            limit = None
        if limit is not None and not _amount(limit):
            shown = repr(limit)
            shown = shown if len(shown) <= 40 else f"{shown[:30]}... ({len(shown)} characters)"
            raise BadRequest(f'"limit" must be an amount in USD (0 or more), null or "off", '
                             f"not {shown}")  # fmt: skip
        out: dict[str, Any] = {"limit": limit}
        if body.get("endpoint") is not None:
            if not isinstance(body["endpoint"], str):
                raise BadRequest('"endpoint" must be an endpoint name')
            out["endpoint"] = endpoint_name(body["endpoint"])
        return await self.relay.request("PUT", "/v1/budget", out)


class BillingHandler(FlashHandler):
    """``GET /billing``: what the control plane billed, per endpoint and for the session."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        await self.relayed("GET", "/v1/billing")


class PrewarmHandler(FlashHandler):
    """``POST /prewarm`` ``{"line": "%%flash ...", "kernel_id"?: id}``: warm one worker of
    the endpoint that cell would run on (the same settings rules), creating the endpoint if
    it does not exist yet.

    Selecting a cell never changes an endpoint: one whose settings the line would change is
    left alone (its workers and the notebook state on them stay; the change happens when the
    cell runs, and a worker warmed now would only be replaced). With the budget reached,
    nothing is created or warmed (402). The kernel's ``%flash config`` defaults live in the
    kernel: only the line counts."""

    @web.authenticated
    @authorized
    async def post(self) -> None:
        await self.run(self._prewarm())

    async def _prewarm(self) -> dict[str, Any]:
        body = self.body()
        only(body, ("line", "kernel_id"))
        if body.get("kernel_id") is not None and not isinstance(body["kernel_id"], str):
            raise BadRequest('"kernel_id" must be a string')
        try:
            name, changes = endpoint_for(body.get("line"))
        except LineError as e:
            raise BadRequest(str(e)) from None
        budget = await self.relay.request("GET", "/v1/budget")
        mine = (budget.get("endpoints") or {}).get(name) or {}
        if "reached" in (budget.get("state"), mine.get("state")):
            raise RelayError(402, f"the budget is reached: endpoint {name!r} was not warmed")
        try:
            current = await self.relay.request("GET", f"/v1/endpoints/{name}")
        except RelayError as e:
            if e.status != 404:
                raise
            current = None
        if current is not None:
            try:
                cfg = EndpointConfig.from_dict(current["config"])
                changed = cfg.changed(**changes).config_hash != current["config_hash"]
            except (ConfigError, KeyError, TypeError) as e:
                raise BadRequest(f"{name}: {e}") from None
            if changed:
                return {"endpoint": name, "action": "unchanged", "warmed": False,
                        "reason": "the cell changes this endpoint's settings: they apply when "
                                  "it runs, so no worker was warmed now"}  # fmt: skip
            action = "reused"
        else:
            view = await self.relay.request(
                "PUT", f"/v1/endpoints/{name}", {"changes": changes, "serves": "cells"}
            )
            action = view.get("action", "created")
        await self.relay.request("POST", f"/v1/endpoints/{name}/warm", {"workers": 1})
        return {"endpoint": name, "action": action, "warmed": True}


class EventsHandler(WebSocketMixin, websocket.WebSocketHandler, JupyterHandler):
    """``GET /events``: a WebSocket of the control plane's events (see ``events.EventHub``).
    Jupyter's authentication (the token as a query parameter, or the cookie) and
    authorization are checked before the upgrade."""

    auth_resource = AUTH_RESOURCE

    @property
    def hub(self) -> EventHub:
        return self.settings[SETTINGS_KEY]["hub"]

    async def pre_get(self) -> None:
        allowed = await ensure_async(
            self.authorizer.is_authorized(self, self.current_user, "read", AUTH_RESOURCE)
        )
        if not allowed:
            raise web.HTTPError(403)

    @ws_authenticated
    async def get(self, *args: Any, **kwargs: Any) -> None:
        await self.pre_get()
        res = super().get(*args, **kwargs)
        if res is not None:
            await res

    _unsent = 0  # characters written to the socket and not yet taken by the browser
    _dropped = False

    def open(self, *args: Any, **kwargs: Any) -> None:
        super().open(*args, **kwargs)
        self.hub.add(self)

    def on_message(self, message: str | bytes) -> None:
        pass  # the browser only listens

    def on_close(self) -> None:
        self.hub.remove(self)

    def send(self, text: str) -> None:
        """Queue ``text``; a browser that has ``MAX_UNSENT`` waiting is dropped instead (its
        events would otherwise pile up in this server's memory)."""
        if self._dropped:
            raise websocket.WebSocketClosedError()
        if self._unsent > MAX_UNSENT:
            self.drop("fell behind the events; reconnect for a fresh snapshot")
            raise websocket.WebSocketClosedError()
        n = len(text)
        self._unsent += n
        self.write_message(text).add_done_callback(lambda f: self._written(f, n))

    def _written(self, f: Future, n: int) -> None:
        self._unsent -= n
        if not f.cancelled():
            f.exception()  # a closed stream's error is expected: retrieved, not logged

    def drop(self, reason: str) -> None:
        """Close the socket now (1013: try again later); tornado aborts it if the browser
        does not answer the close, which frees what was queued for it."""
        self._dropped = True
        self.log.warning("flash-jupyter: events socket dropped: %s", reason)
        self.close(1013, reason[:120])


_NAME = r"(?P<name>[^/]+)"


def setup(serverapp: Any) -> None:
    """Add the routes to the server's web app (called by ``_load_jupyter_server_extension``)."""
    web_app = serverapp.web_app
    relay = Relay(serverapp.log)
    web_app.settings[SETTINGS_KEY] = {"relay": relay, "hub": EventHub(relay)}
    base = url_path_join(web_app.settings["base_url"], API)
    routes = [
        ("status", StatusHandler),
        ("start", StartHandler),
        ("endpoints", EndpointsHandler),
        (f"endpoints/{_NAME}", EndpointHandler),
        (f"endpoints/{_NAME}/(?P<action>warm|scale|stop|purge)", EndpointActionHandler),
        ("budget", BudgetHandler),
        ("billing", BillingHandler),
        ("prewarm", PrewarmHandler),
        ("events", EventsHandler),
    ]
    web_app.add_handlers(".*$", [(url_path_join(base, path), h) for path, h in routes])
