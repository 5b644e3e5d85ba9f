"""Runpod's ``webhook`` request field: the job's final status POSTed to a URL when it ends.

As Runpod does (docs.runpod.io, "Send API requests", "Webhook notifications"): the body is
the job's ``/status`` JSON, a ``2xx`` answer acknowledges it, and a failed call is tried up to
2 more times, 10 s apart (``FLASH_JUPYTER_WEBHOOK_RETRY_DELAY``). Any host, as on Runpod
(whoever holds the token can already run code on the workers); ``FLASH_JUPYTER_WEBHOOK_HOSTS``
restricts them. The URL is checked at the door (``Webhooks.check``), before anything is
recorded.

Never on the control plane's way: ``send`` only schedules the delivery, which runs as a task
(async httpx, imported on first use) with a time limit per attempt, a bounded number of
requests at once and a bounded backlog; the job is finished before its webhook is called.
Each attempt is kept in the job's record (``Delivery``, shown as ``webhook`` in its status).
Deliveries live in memory: a restart of the control plane drops the retries still pending.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import sys
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .. import __version__, envvars

if TYPE_CHECKING:
    from . import model as m
    from .control import ControlPlane

MAX_URL = 2048  # characters in a webhook URL
ATTEMPTS = 3  # the first call and Runpod's 2 retries
ATTEMPT_TIMEOUT = 10.0  # seconds one attempt may take, all of it (connect, send, answer)
CONCURRENCY = 8  # webhook requests in flight at once
MAX_PENDING = 10_000  # deliveries waiting or under way; past it a new one is dropped (noted)
HOSTS_ENV = "FLASH_JUPYTER_WEBHOOK_HOSTS"
DELAY_ENV = "FLASH_JUPYTER_WEBHOOK_RETRY_DELAY"
_NAME = re.compile(r"[a-z0-9_.-]{1,253}")  # a host name as urlsplit gives it (lower case)


class WebhookError(ValueError):
    """A request's ``webhook`` cannot be used (HTTP 400, before anything is recorded)."""


class Delivery:
    """A job's webhook: its URL, where its delivery stands, and each attempt."""

    __slots__ = ("attempts", "state", "url")

    def __init__(self, url: str):
        self.url = url
        self.state = "waiting"  # the job runs; then sending, delivered, failed or dropped
        self.attempts: list[dict[str, Any]] = []

    def view(self) -> dict[str, Any]:
        """What a job's status shows (not the URL: it may carry a secret)."""
        return {"state": self.state, "attempts": list(self.attempts)}


def normal_host(host: str) -> str:
    """A host as compared with the allowed list: lower case, an IP address in its
    canonical form (``::1``, ``127.0.0.1``), brackets removed."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def parse_hosts(text: str | None) -> tuple[frozenset[str] | None, list[str]]:
    """``FLASH_JUPYTER_WEBHOOK_HOSTS`` as a set of allowed hosts (None: any host), and the
    entries that are not a host name or an IP address (left out, so the list only narrows)."""
    if text is None or not text.strip():
        return None, []
    allowed, bad = set(), []
    for entry in text.split(","):
        if not entry.strip():
            continue
        host = normal_host(entry)
        if _NAME.fullmatch(host) or (":" in host and _is_ip(host)):
            allowed.add(host)
        else:
            bad.append(entry.strip())
    return frozenset(allowed), bad


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def check_url(url: Any, allowed: frozenset[str] | None) -> str:
    """The webhook URL of a request, or WebhookError saying what is wrong with it.

    Only plain absolute URLs pass: printable ASCII without spaces or backslashes (so that
    this check and the HTTP client read the same host), ``http`` or ``https``, a host, no
    user name or password, a valid port; on the allowed list when there is one."""
    if not isinstance(url, str):
        raise WebhookError(f'"webhook" must be a URL string (http:// or https://), not '
                           f"{type(url).__name__}")  # fmt: skip
    if len(url) > MAX_URL:
        raise WebhookError(f'"webhook" is {len(url)} characters long; at most {MAX_URL}')
    if not url.isascii() or any(c <= " " or c in "\\\x7f" for c in url):
        raise WebhookError('"webhook" may hold only printable ASCII without spaces or '
                           "backslashes; percent-encode the rest")  # fmt: skip
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise WebhookError(f'"webhook" is not a valid URL: {e}') from None
    if parts.scheme.lower() not in ("http", "https"):
        raise WebhookError(f'"webhook" must be an absolute http:// or https:// URL, not '
                           f"{url[:80]!r}")  # fmt: skip
    if "@" in parts.netloc:
        raise WebhookError('"webhook" may not carry a user name or password (user@host); '
                           "put a secret in its path or query instead")  # fmt: skip
    host = parts.hostname or ""
    bracketed = parts.netloc.startswith("[")
    if not host or not (_NAME.fullmatch(host) if not bracketed else _is_ip(host)):
        raise WebhookError(f'"webhook" has no valid host: {url[:80]!r}')
    if port == 0:
        raise WebhookError('"webhook" port must be from 1 to 65535')
    if allowed is not None and normal_host(host) not in allowed:
        raise WebhookError(
            f"webhook host {host!r} is not allowed: this control plane sends webhooks only to "
            f"{', '.join(sorted(allowed)) or 'no host'} ({HOSTS_ENV})"
        )
    return url


def _retry_delay() -> float:
    try:
        return float(envvars.get(DELAY_ENV))
    except envvars.EnvVarError as e:
        print(f"flash-jupyter: {e}; using {envvars.BY_NAME[DELAY_ENV].default:g}", file=sys.stderr)
        return float(envvars.BY_NAME[DELAY_ENV].default)


class Webhooks:
    """The control plane's webhook sender (``cp.webhooks``): settings read once, at start."""

    def __init__(self, cp: ControlPlane):
        self.cp = cp
        self.allowed, bad = parse_hosts(envvars.get(HOSTS_ENV))
        if bad:
            print(f"flash-jupyter: {HOSTS_ENV}: ignoring {', '.join(map(repr, bad))} (not a "
                  f"host name or IP address)", file=sys.stderr)  # fmt: skip
        self.retry_delay = _retry_delay()
        self.pending = 0
        self._tasks: set[asyncio.Task] = set()
        self._client: Any = None
        self._slots: asyncio.Semaphore | None = None

    def check(self, url: Any) -> str:
        return check_url(url, self.allowed)

    def send(self, job: m.Job) -> None:
        """Deliver ``job``'s final status to its webhook, in the background."""
        d: Delivery = job.hook
        if self.pending >= MAX_PENDING:
            d.state = "dropped"
            d.attempts.append({"time": time.time(), "error": f"not sent: {MAX_PENDING} webhook "
                               f"deliveries already pending"})  # fmt: skip
            return
        from .http_app import render_json  # the /status JSON, exactly as served

        payload = self.cp.status_payload(job)
        payload.pop("webhook", None)
        body = render_json(payload)
        d.state = "sending"
        self.pending += 1
        task = asyncio.ensure_future(self._deliver(d, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, d: Delivery, body: bytes) -> None:
        try:
            for attempt in range(ATTEMPTS):
                if attempt:
                    await asyncio.sleep(self.retry_delay)
                if self._slots is None:
                    self._slots = asyncio.Semaphore(CONCURRENCY)
                async with self._slots:
                    result = await self._post(d.url, body)
                d.attempts.append(result)
                if 200 <= result.get("status", 0) < 300:
                    d.state = "delivered"
                    return
            d.state = "failed"
        finally:
            self.pending -= 1

    async def _post(self, url: str, body: bytes) -> dict[str, Any]:
        """One attempt: the answer's status, or why there was none. The answer's body is
        never read, and redirects are not followed (a redirect is a failed attempt)."""
        at = time.time()
        try:
            import httpx

            if self._client is None:
                self._client = httpx.AsyncClient(timeout=ATTEMPT_TIMEOUT, follow_redirects=False)
            if normal_host(httpx.URL(url).host) != normal_host(urlsplit(url).hostname or ""):
                return {"time": at, "error": "the URL's host reads differently to the HTTP "
                        "client; not sent"}  # fmt: skip
            status = await asyncio.wait_for(self._request(url, body), ATTEMPT_TIMEOUT)
            return {"time": at, "status": status}
        except asyncio.TimeoutError:
            return {"time": at, "error": f"no answer within {ATTEMPT_TIMEOUT:g} s"}
        except Exception as e:  # connection refused, bad TLS, ...: a failed attempt
            return {"time": at, "error": f"{type(e).__name__}: {e}"[:300]}

    async def _request(self, url: str, body: bytes) -> int:
        headers = {"Content-Type": "application/json",
                   "User-Agent": f"flash-jupyter/{__version__} (webhook)"}  # fmt: skip
        async with self._client.stream("POST", url, content=body, headers=headers) as r:
            return r.status_code

    async def close(self) -> None:
        """Stop what is pending (a clean stop of the control plane)."""
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None
