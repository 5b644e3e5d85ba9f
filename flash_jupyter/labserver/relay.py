"""The Jupyter server's side of the control plane: found, started and called from here.

The browser never talks to the control plane: it talks to the Jupyter server (under
Jupyter's own authentication), and this relay calls the control plane with its bearer
token, which therefore never leaves this process. Discovery and auto-start are the
client's (``client.discover``, ``client.start_local``): the same control plane a kernel
of this server would use (``FLASH_JUPYTER_URL`` or the machine-local one of
``FLASH_JUPYTER_HOME``). Both block, so they run in a thread, never on the server's loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import traceback
from typing import Any
from urllib.parse import urlparse

import httpx

from .. import __version__, client, envvars, errors

NOT_RUNNING = "no control plane is running"
START_HINT = "Start starts one on this machine (or run `flash-jupyter serve`)"


class NotRunning(Exception):
    """No control plane answers; ``message`` says why and what to do."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class RelayError(Exception):
    """The control plane answered with an error: relayed with its status and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def remote_mode() -> bool:
    """Whether ``FLASH_JUPYTER_URL`` names the control plane (which this server cannot start)."""
    return envvars.is_set("FLASH_JUPYTER_URL")


class Relay:
    """One per Jupyter server: the control plane's address and an HTTP client for it."""

    def __init__(self, log: logging.Logger | None = None) -> None:
        self.log = log or logging.getLogger(__name__)
        self._info: dict[str, Any] | None = None
        self._http: httpx.AsyncClient | None = None
        self._http_key: tuple[str, str] | None = None
        self._closing: set[asyncio.Task] = set()

    # -- discovery
    async def info(self, refresh: bool = False) -> dict[str, Any]:
        """The control plane's connection details; NotRunning when none answers.

        Cached; ``refresh`` looks again (the runtime file, or ``/v1/info`` of
        ``FLASH_JUPYTER_URL``), as after a failed connection or a start."""
        if self._info is not None and not refresh:
            return self._info
        try:
            info = await asyncio.to_thread(client.discover, False)
        except errors.AuthError:
            raise NotRunning(
                f"the control plane at {envvars.get('FLASH_JUPYTER_URL')} refused this Jupyter "
                "server's token: set FLASH_JUPYTER_TOKEN for the server, then restart it"
            ) from None
        except errors.ControlPlaneError as e:
            self._info = None
            if remote_mode():
                raise NotRunning(self.scrub(f"{e} (FLASH_JUPYTER_URL); start it there")) from None
            raise NotRunning(f"{NOT_RUNNING}; {START_HINT}") from None
        except Exception as e:  # its text may echo the token (an invalid header value)
            self._info = None
            if not _bad_token():
                self.log_error("looking up the control plane", e)
            raise NotRunning(_lookup_failed(e)) from None
        self._info = info
        return info

    def http(self, info: dict[str, Any]) -> httpx.AsyncClient:
        """The HTTP client for this control plane (made again when its address or token
        changed, as after a restart of the machine-local one)."""
        key = (info["url"], info.get("token", ""))
        if self._http is None or self._http_key != key:
            if self._http is not None:  # the control plane it spoke to is gone
                task = asyncio.ensure_future(self._http.aclose())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            self._http = httpx.AsyncClient(
                base_url=key[0], headers={"Authorization": f"Bearer {key[1]}"}, timeout=30
            )
            self._http_key = key
        return self._http

    def scrub(self, text: str) -> str:
        """``text`` with the control plane's token masked: a last guard, so that nothing
        this server sends to a browser or writes to its log can carry it (the token of
        the control plane in use, and FLASH_JUPYTER_TOKEN as set, as ``repr`` shows it too)."""
        for token in (
            (self._info or {}).get("token") or "",
            (self._http_key or ("", ""))[1],
            envvars.get("FLASH_JUPYTER_TOKEN") or "",
        ):
            for t in (token, token.strip(), repr(token)[1:-1]):
                if len(t) >= 4 and t in text:
                    text = text.replace(t, "***")
        return text

    def log_error(self, where: str, e: BaseException) -> None:
        """An unexpected failure, with its traceback, in the Jupyter server's log (scrubbed:
        an exception's text may echo a request header)."""
        text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        self.log.error("flash-jupyter: %s failed:\n%s", where, self.scrub(text))

    # -- requests
    async def request(self, method: str, path: str, body: Any = None) -> Any:
        """Call the control plane; its JSON answer, or RelayError with its status and
        message, or NotRunning. A refused connection or token looks for the control plane
        again once (it may have restarted on another port or with another token)."""
        for attempt in (0, 1):
            info = await self.info(refresh=attempt == 1)
            try:
                r = await self.http(info).request(method, path, json=body)
            except httpx.ConnectError:
                if attempt == 0:
                    continue
                self._info = None
                raise NotRunning(
                    f"{NOT_RUNNING}; {START_HINT}"
                    if not remote_mode()
                    else f"cannot reach the control plane at {info['url']}; start it there"
                ) from None
            except httpx.HTTPError as e:
                raise RelayError(502, f"the control plane did not answer {method} {path}: "
                                      f"{type(e).__name__}") from None  # fmt: skip
            if r.status_code == 401:
                if attempt == 0:
                    continue
                raise RelayError(502, "the control plane refused this Jupyter server's token "
                                      "(FLASH_JUPYTER_TOKEN)")  # fmt: skip
            return _answer(r, method, path)
        raise AssertionError("unreachable")

    # -- status and start
    async def status(self) -> dict[str, Any]:
        """``{"running", "version", "url_host", "message"}`` (and ``can_start``): never
        the token."""
        base = {"version": __version__, "can_start": not remote_mode()}
        try:
            info = await self.info(refresh=True)
            about = await self.request("GET", "/v1/info")
        except NotRunning as e:
            return {**base, "running": False, "url_host": None, "message": e.message}
        except RelayError as e:
            return {**base, "running": False, "url_host": None, "message": e.message}
        host = urlparse(info["url"]).netloc
        where = "FLASH_JUPYTER_URL" if remote_mode() else "this machine"
        return {
            **base,
            "running": True,
            "url_host": host,
            "control_plane_version": about.get("version") if isinstance(about, dict) else None,
            "message": f"control plane running at {host} ({where})",
        }

    async def start(self) -> dict[str, Any]:
        """Start the machine-local control plane (in a thread: it waits for the runtime
        file) unless one runs; the status after. RelayError 409 when FLASH_JUPYTER_URL
        names one elsewhere that does not answer."""
        status = await self.status()
        if status["running"]:
            return status
        if remote_mode():
            raise RelayError(
                409,
                f"FLASH_JUPYTER_URL names the control plane ({envvars.get('FLASH_JUPYTER_URL')})"
                "; this Jupyter server cannot start it: start it there (flash-jupyter serve)",
            )
        try:
            await asyncio.to_thread(client.start_local)
        except (errors.FlashError, OSError) as e:
            raise RelayError(503, f"could not start the control plane: {e}") from None
        return await self.status()


def _bad_token() -> bool:
    """FLASH_JUPYTER_TOKEN has what no HTTP header can carry (a stray \\r from a CRLF file)."""
    token = envvars.get("FLASH_JUPYTER_TOKEN") or ""
    return bool(token) and (token != token.strip() or not token.isprintable())


def _lookup_failed(e: Exception) -> str:
    """Why the control plane could not be looked up, from an unexpected error, without its
    text (urllib's "Invalid header value b'Bearer ...'" carries the token)."""
    if _bad_token():
        return ("FLASH_JUPYTER_TOKEN cannot be sent in an HTTP header (it has a space, newline "
                "or control character, often a trailing \\r or \\n): set it to the token "
                "alone, then restart the Jupyter server")  # fmt: skip
    return (f"could not look up the control plane ({type(e).__name__}); see the Jupyter "
            "server's log, or run `flash-jupyter status`")  # fmt: skip


def _answer(r: httpx.Response, method: str, path: str) -> Any:
    try:
        body = r.json()
    except (ValueError, json.JSONDecodeError):
        body = None
    if r.status_code >= 400:
        msg = body.get("error") if isinstance(body, dict) else None
        raise RelayError(r.status_code, msg or f"{method} {path}: HTTP {r.status_code}")
    if body is None:
        raise RelayError(502, f"the control plane's answer to {method} {path} is not JSON")
    return body
