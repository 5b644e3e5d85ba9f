"""schemathesis fuzzes every route of /openapi.json against a real control plane.

Each operation of the served schema gets cases generated from it, both valid ones
(positive) and ones that break it on purpose (negative: wrong types, missing fields,
values out of range), sent with the token to a real control plane over real HTTP. No
answer may be a 5xx, every answer must come within ``REQUEST_LIMIT`` seconds (a hang
fails the test), be JSON with a status the schema documents for that operation.

Path parameters are half the time the generated string, half the time a name that exists,
so the handlers run past their lookups: the /v2 job routes use an endpoint with a real
handler (jobs are queued, run and answered), the /v1 routes another one, so that what
fuzzing does to one endpoint's settings cannot stall the other's jobs. Job routes use, half
the time, the id of a job that fuzzing submitted.

CI runs ``FUZZ_EXAMPLES`` cases per operation (default 25); a long run:
``FLASH_JUPYTER_FUZZ_EXAMPLES=2000 pytest -p no:cacheprovider tests/test_fuzz_http.py``
(docs/security.md, "Fuzzing", also gives schemathesis's own command line).
"""

from __future__ import annotations

import http.client
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from urllib.parse import quote_from_bytes, unquote, urlencode

import httpx
import pytest
import requests
import schemathesis
from conftest import make_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from flash_jupyter.server import openapi

FUZZ_EXAMPLES = int(os.environ.get("FLASH_JUPYTER_FUZZ_EXAMPLES", "25"))
REQUEST_LIMIT = 30.0  # seconds: an answer later than this is a hang
ECHO = "fuzz-echo"  # has a handler: /v2 routes run real jobs on it
MANAGED = "fuzz-managed"  # what /v1 routes change
JOB_IDS: list[str] = []  # jobs fuzzing submitted, reused as path parameters
STATUSES: defaultdict[tuple[str, str], Counter] = defaultdict(Counter)  # what came back

OPS = [pytest.param(op, id=f"{op.method} {op.path}") for op in openapi.ROUTES]


def _echo(**kw):
    return kw


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory) -> Iterator:
    """A control plane of its own: one worker slot, no spare, no package index (an endpoint
    given dependencies fails to build at once), webhooks only to 127.0.0.1."""
    from flash_jupyter import Endpoint
    from flash_jupyter import client as fj_client

    srv = make_server(
        tmp_path_factory.mktemp("fuzz"),
        FLASH_JUPYTER_MAX_WORKERS="1",
        FLASH_JUPYTER_SPARE_WORKERS="0",
        FLASH_JUPYTER_WEBHOOK_HOSTS="127.0.0.1",
        FLASH_JUPYTER_WEBHOOK_RETRY_DELAY="0.1",
        PIP_NO_INDEX="1",
        UV_OFFLINE="1",
    ).start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FLASH_JUPYTER_URL", srv.url)
            mp.setenv("FLASH_JUPYTER_TOKEN", srv.token)
            fj_client.reset_client()
            echo = Endpoint(name=ECHO, cpu="cpu3c-1-2", workers=(0, 1), idle_timeout=600)(_echo)
            assert echo(x=1) == {"x": 1}
            fj_client.reset_client()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    schema = schemathesis.openapi.from_url(
        fuzz_server.url + "/openapi.json",
        headers={"Authorization": f"Bearer {fuzz_server.token}"},
        timeout=30,
    )
    # The token is always the right one here (test_openapi.py walks every route with bad
    # ones): generated cases go to the handlers, not to the door.
    schema.config.generation.update(with_security_parameters=False)
    return schema


def cases(operation, op: openapi.Op):
    """Positive and negative cases, with the path's names as generated or ones that exist."""
    known = ECHO if op.path.startswith("/v2/") else MANAGED
    strategies = []
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        strategies.append(operation.as_strategy(mode))
        if "{name}" in op.path:
            strategies.append(operation.as_strategy(mode, path_parameters={"name": known}))
    return st.one_of(strategies)


def check_answer(op: openapi.Op, r: requests.Response, what: str) -> None:
    assert r.status_code < 500, f"{what} -> {r.status_code} {r.text[:2000]}"
    documented = {200, *op.errors, *(() if op.public else (401,))}
    assert r.status_code in documented, f"{what} -> undocumented {r.status_code} {r.text[:500]}"
    if op.media == "application/json":
        body = r.json()  # raises if the answer is not JSON
        if r.status_code != 200:
            assert isinstance(body, dict) and isinstance(body.get("error"), str), body


@pytest.mark.parametrize("op", OPS)
def test_fuzz_route(fuzz_server, api_schema, op):
    operation = api_schema[op.path][op.method]
    with fuzz_server.http() as h:  # whatever an earlier operation did to it
        h.put(f"/v1/endpoints/{MANAGED}", json={"workers": 1})
    auth = {"Authorization": f"Bearer {fuzz_server.token}"}

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases(operation, op), reuse=st.booleans())
    def run(case, reuse):
        if reuse and JOB_IDS and "job" in case.path_parameters:
            case.path_parameters["job"] = JOB_IDS[-1]
        what = f"{case.method} {case.formatted_path} {case.query} {case.body!r:.300}"
        try:
            if op.handler == "events":  # never ends: its first event is the answer
                kw = case.as_transport_kwargs(base_url=fuzz_server.url, headers=auth)
                with requests.request(**kw, stream=True, timeout=REQUEST_LIMIT) as r:
                    check_answer(op, r, what)
                    if r.status_code == 200:
                        assert next(r.iter_lines()).startswith(b"data: ")
                    STATUSES[op.method, op.path][r.status_code] += 1
                return
            r = case.call(base_url=fuzz_server.url, headers=auth, timeout=REQUEST_LIMIT)
        except requests.Timeout:
            pytest.fail(f"no answer within {REQUEST_LIMIT} s: {what}")
        check_answer(op, r, what)
        STATUSES[op.method, op.path][r.status_code] += 1
        if op.handler in ("run", "runsync") and r.status_code == 200:
            JOB_IDS.append(r.json()["id"])

    run()
    print(f"{op.method} {op.path}: {dict(sorted(STATUSES[op.method, op.path].items()))}")
    # The control plane is alive and well after it.
    assert httpx.get(fuzz_server.url + "/ping", timeout=10).status_code == 200
    assert fuzz_server.proc.poll() is None


# ------------------------------------------- requests the schema does not describe

segment = st.binary(max_size=40).map(lambda b: quote_from_bytes(b, safe=""))
raw_body = st.one_of(
    st.binary(max_size=300),  # not JSON, not UTF-8
    st.text(max_size=300).map(str.encode),
    st.builds(lambda depth: b"[" * depth + b"]" * depth, st.integers(0, 5000)),
    st.sampled_from([b"NaN", b"1e999", b'{"input": {"x": 1e999}}', b'{"input": []}',
                     b"\xef\xbb\xbf{}", b'"\\ud800"', b'{"input": {"\\ud800": 1}}',
                     b"-0", b"[]", b"{}", b"null"]),
)  # fmt: skip
query = st.lists(
    st.tuples(
        st.sampled_from(["wait", "all", "tail", "limit", "endpoint", "x"]), st.text(max_size=30)
    ),
    max_size=3,
).map(lambda pairs: urlencode(pairs)) | st.binary(max_size=30).map(
    lambda b: quote_from_bytes(b, safe="=&")
)
ctype = st.sampled_from(["application/json", "text/plain", "", "application/json; charset=utf-16",
                         "multipart/form-data; boundary=x"])  # fmt: skip


@pytest.mark.parametrize("op", OPS)
def test_raw_requests(fuzz_server, op):
    """Bytes the schema does not allow: any path segment (percent-encoded bytes), any query
    string, any body and content type. Same rules: no 5xx, an answer in time, documented."""
    auth = f"Bearer {fuzz_server.token}"
    host, port = "127.0.0.1", fuzz_server.port

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(name=segment | st.sampled_from([ECHO, MANAGED]), job=segment, q=query, body=raw_body,
           ct=ctype)  # fmt: skip
    def run(name, job, q, body, ct):
        path = op.path.replace("{name}", name or "x").replace("{job}", job or "j")
        target = path + ("?" + q if q else "")
        what = f"{op.method} {target} {ct} {body[:200]!r}"
        conn = http.client.HTTPConnection(host, port, timeout=REQUEST_LIMIT)
        try:
            headers = {"Authorization": auth, "Content-Length": str(len(body))}
            if ct:
                headers["Content-Type"] = ct
            conn.request(op.method, target, body=body, headers=headers)
            if op.handler == "events":
                r = conn.getresponse()
                assert r.status < 500, what
                return
            r = conn.getresponse()
            data = r.read()
        except TimeoutError:
            pytest.fail(f"no answer within {REQUEST_LIMIT} s: {what}")
        finally:
            conn.close()
        assert r.status < 500, f"{what} -> {r.status} {data[:2000]!r}"
        documented = {200, *op.errors, *(() if op.public else (401,))}
        used = [v for k, v in (("{name}", name), ("{job}", job)) if k in op.path]
        if any("/" in unquote(v) for v in used):
            # Another path: Starlette's router sends /a/b/ to /a/b (307), or no route (404).
            documented |= {307, 404}
        assert r.status in documented, f"{what} -> undocumented {r.status} {data[:500]!r}"
        if op.media == "application/json" and r.status != 307:
            json.loads(data)

    run()
    assert fuzz_server.proc.poll() is None
