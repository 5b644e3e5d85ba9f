"""The OpenAPI schema at /openapi.json, and the token on every route (docs/security.md).

The schema and the routing table come from one description (server/openapi.py); these tests
check the served schema against the app's real routes both ways (every route documented,
nothing documented that does not exist), and walk every route without the token and with a
wrong one.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from flash_jupyter.server import openapi
from flash_jupyter.server.http_app import build_app

DOCS = Path(__file__).resolve().parent.parent / "docs"


def app_routes() -> set[tuple[str, str]]:
    """(method, path) of every route of the HTTP app as Starlette routes it (HEAD, which
    Starlette adds to each GET, left out)."""
    app = build_app(None, "token", {})  # the control plane is only used by requests
    out = set()
    for r in app.app.routes:
        out |= {(m, r.path) for m in r.methods if m != "HEAD"}
    return out


def schema_routes(doc: dict) -> set[tuple[str, str]]:
    return {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}


def concrete(path: str) -> str:
    return path.replace("{name}", "no-such-endpoint").replace("{job}", "no-such-job")


def test_the_served_schema_documents_exactly_the_apps_routes(server):
    got = httpx.get(server.url + "/openapi.json", headers=auth(server.token), timeout=30)
    assert got.status_code == 200, got.text
    assert got.headers["content-type"].startswith("application/json")
    served = got.json()
    routes = app_routes()
    assert schema_routes(served) == routes, (
        f"undocumented: {sorted(routes - schema_routes(served))}; "
        f"documented, not routed: {sorted(schema_routes(served) - routes)}"
    )
    assert len(routes) == len(openapi.ROUTES)
    assert served["openapi"].startswith("3.")
    assert served["paths"]["/ping"]["get"]["security"] == []  # liveness: the one open route


def test_the_schema_is_valid_openapi():
    import schemathesis

    schemathesis.openapi.from_dict(openapi.schema("1")).validate()


def test_every_documented_route_is_served_and_other_methods_are_not(server):
    """Against the running control plane: each documented method on each documented path
    reaches a handler (not the router's 404 or 405), and every other method gets 405 with
    an ``Allow`` header naming the path's methods."""
    every = {"GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"}
    documented = schema_routes(openapi.schema())
    with server.http() as h:
        for path in {p for _, p in documented}:
            methods = {m for m, p in documented if p == path}
            for method in every:
                if method == "GET" and path == "/v1/events":
                    with h.stream("GET", path) as r:
                        assert r.status_code == 200
                    continue
                # A body that every handler refuses: nothing is created or changed.
                r = h.request(method, concrete(path), params={"wait": "0"}, content=b"[]")
                body = r.text
                if method in methods:
                    assert r.status_code != 405, (method, path, body)
                    assert "no route" not in body, (method, path, body)
                else:
                    assert r.status_code == 405, (method, path, r.status_code, body)
                    # RFC 9110: a 405 says what is allowed (found by schemathesis, ST204).
                    allow = set(r.headers["allow"].split(", "))
                    assert allow == methods | ({"HEAD"} if "GET" in methods else set()), (
                        method,
                        path,
                        allow,
                    )


def test_rest_api_docs_mention_the_schema():
    text = (DOCS / "rest-api.md").read_text()
    assert "/openapi.json" in text


# ------------------------------------------------------- the token on every route


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


BAD_AUTH = {
    "missing": {},
    "wrong": {"Authorization": "Bearer not-the-token"},
    "empty": {"Authorization": "Bearer"},
    "scheme": {"Authorization": "Basic dXNlcjpwYXNz"},
    "no-scheme": {"Authorization": "TOKEN"},
}


@pytest.mark.parametrize("how", sorted(BAD_AUTH))
def test_every_route_but_liveness_refuses_a_missing_or_wrong_token(server, how):
    """Each route of the description, with each kind of bad credential: 401 before the
    handler runs (for PUT and DELETE: nothing is created or deleted)."""
    headers = BAD_AUTH[how]
    name = f"auth-probe-{how}"
    checked = 0
    with httpx.Client(base_url=server.url, timeout=30) as h:
        for op in openapi.ROUTES:
            path = op.path.replace("{name}", name).replace("{job}", "j1")
            body = b'{"input": {}, "workers": 1, "limit": 1, "min": 0, "max": 1}'
            r = h.request(op.method, path, headers=headers, content=body)
            if op.public:
                assert r.status_code == 200, (op.method, op.path)
                continue
            assert r.status_code == 401, (op.method, op.path, r.status_code, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            assert r.json() == {"error": "401 Unauthorized: missing or wrong bearer token"}
            checked += 1
        # Paths no route has are refused the same (no probing for what exists).
        assert h.get("/v3/nothing", headers=headers).status_code == 401
    assert checked == len(openapi.ROUTES) - 1
    with server.http() as h:  # nothing was created by the refused PUT
        assert h.get(f"/v1/endpoints/{name}").status_code == 404


def test_the_worker_credential_is_not_an_http_token(server):
    from flash_jupyter import credentials

    cred = credentials.worker_credential(server.token, "w-1", 1)
    r = httpx.get(server.url + "/v1/info", headers=auth(cred), timeout=30)
    assert r.status_code == 401


def test_the_bearer_token_is_compared_in_constant_time():
    """Whitebox: the middleware compares with hmac.compare_digest, never ``==``."""
    import inspect

    from flash_jupyter.server import http_app

    src = inspect.getsource(http_app.BearerAuth.__call__)
    assert "hmac.compare_digest(" in src
    assert not re.search(r"(given|token)\S*\s*[!=]=", src)


def test_wire_credentials_are_compared_in_constant_time():
    """Whitebox: the wire's hello checks every credential through ``credentials.same``
    (hmac.compare_digest), never ``==``."""
    import inspect

    from flash_jupyter import credentials
    from flash_jupyter.server import wire_server

    assert "hmac.compare_digest(" in inspect.getsource(credentials.same)
    hello = inspect.getsource(wire_server.Connection._hello)
    assert hello.count("credentials.same(") == 3  # client, worker, spare
    assert not re.search(r"(given|token)\s*[!=]=", hello)
    assert credentials.same("abc", "abc") and not credentials.same("abc", "abd")
    assert not credentials.same("abc", None) and not credentials.same("abc", b"abc")


def test_a_default_start_listens_on_loopback_only_and_keeps_its_files_private(tmp_path):
    """``python -m flash_jupyter.server`` with no --host: both ports on 127.0.0.1 only; the
    data directory it creates is 0700, its runtime and settings files 0600, its spool
    folder 0700 and the user's."""
    import json
    import os
    import secrets
    import signal
    import stat
    import subprocess
    import sys

    import psutil
    from conftest import wait_for

    data = tmp_path / "new" / "data"  # not there yet: the control plane creates it
    ready = tmp_path / f"ready-{secrets.token_hex(4)}.json"
    env = {**os.environ, "FLASH_JUPYTER_SPARE_WORKERS": "0"}
    env.pop("FLASH_JUPYTER_URL", None)
    env.pop("FLASH_JUPYTER_TOKEN", None)
    with open(tmp_path / "server.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flash_jupyter.server", "--data-dir", str(data),
             "--exit-with-parent", str(os.getpid()), "--ready-file", str(ready)],
            env=env, stdout=log, stderr=log,
        )  # fmt: skip
    try:
        wait_for(lambda: ready.exists() or proc.poll() is not None, timeout=30, what="start")
        assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
        info = json.loads((data / "runtime.json").read_text())
        wait_for(lambda: httpx.get(info["url"] + "/ping", timeout=5).status_code == 200,
                 timeout=30, what="the HTTP API")  # fmt: skip
        listening = [
            c.laddr
            for c in psutil.Process(proc.pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        ]
        assert {a.port for a in listening} >= {info["wire_port"], int(info["url"].rsplit(":")[-1])}
        assert {a.ip for a in listening} == {"127.0.0.1"}, listening

        def mode(p) -> int:
            return stat.S_IMODE(os.lstat(p).st_mode)

        assert mode(data) == 0o700
        assert mode(data / "runtime.json") == 0o600
        assert mode(data / "server.json") == 0o600
        spool = info["spool"]
        assert mode(spool) == 0o700 and os.lstat(spool).st_uid == os.getuid()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
