"""The control plane's HTTP API, called like Runpod's: real HTTP (httpx) against a real server.

Endpoints get their handler from Python (``fn.deploy()``); the jobs then come in over
``/v2/{name}/...`` with ``{"input": {...}}`` bodies, exactly as a curl user would send them.
Management routes (``/v1/...``) are checked for their shapes and their validation.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest
from conftest import poll, wait_for

from flash_jupyter import Endpoint
from flash_jupyter.server import http_app

# ---------------------------------------------------------------- helpers


def status_of(api: httpx.Client, name: str, jid: str) -> dict:
    r = api.get(f"/v2/{name}/status/{jid}")
    assert r.status_code == 200, r.text
    return r.json()


def wait_gate(gate: str, limit: float = 30) -> None:
    """Block (on the worker) until the file ``gate`` exists: a deterministic barrier."""
    import os
    import time

    t0 = time.monotonic()
    while not os.path.exists(gate):
        if time.monotonic() - t0 > limit:
            raise TimeoutError(f"gate {gate} never opened")
        time.sleep(0.02)


def routes_of_http_app() -> list[tuple[str, str]]:
    """Every (method, path) of http_app.build_app's route table (HEAD, which Starlette adds
    to each GET, left out), read from the app itself: the control plane is only used by
    requests, so none is needed to build it."""
    app = http_app.build_app(None, "token", {})
    return sorted({(m, r.path) for r in app.app.routes for m in r.methods if m != "HEAD"})


def fill(path: str, name: str = "no-such-endpoint", job: str = "0" * 32) -> str:
    return path.replace("{name}", name).replace("{job}", job)


# ---------------------------------------------------------------- the Runpod job API


def test_deployed_function_called_over_http_like_runpod(client, server, api, name):
    @Endpoint(name=name, gpu="A100", workers=(0, 1), idle_timeout=5)
    def combine(a, b, scale=1, tags=()):
        print("combining", a, b)
        return {"sum": (a + b) * scale, "tags": list(tags), "nested": {"ok": True}}

    answer = combine.deploy()
    assert answer["name"] == name and answer["action"] == "created"

    # runsync: one request, the finished job comes back.
    r = api.post(f"/v2/{name}/runsync", json={"input": {"a": 2, "b": 3, "scale": 10}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "COMPLETED", body
    assert body["output"] == {"sum": 50, "tags": [], "nested": {"ok": True}}
    assert isinstance(body["id"], str) and len(body["id"]) >= 16
    assert isinstance(body["delayTime"], int) and body["delayTime"] >= 0
    assert isinstance(body["executionTime"], int) and body["executionTime"] >= 0
    assert body["workerId"].startswith(name)
    assert "error" not in body

    # run: queued at once, then polled with /status.
    r = api.post(f"/v2/{name}/run", json={"input": {"a": 1, "b": 1, "tags": ["x", "y"]}})
    assert r.status_code == 200, r.text
    queued = r.json()
    assert queued["status"] == "IN_QUEUE" and set(queued) >= {"id", "status"}
    assert queued["id"] != body["id"]
    final = poll(api, name, queued["id"])
    assert final["status"] == "COMPLETED"
    assert final["output"] == {"sum": 2, "tags": ["x", "y"], "nested": {"ok": True}}
    assert final["id"] == queued["id"]
    assert final["workerId"].startswith(name)
    assert final["executionTime"] >= 0 and final["delayTime"] >= 0

    # /status is also a POST route at Runpod, and a finished job stays queryable.
    r = api.post(f"/v2/{name}/status/{queued['id']}")
    assert r.status_code == 200 and r.json()["output"] == final["output"]

    # A job id is scoped by its endpoint: asking another endpoint for it is a 404.
    r = api.get(f"/v2/{name}-other/status/{queued['id']}")
    assert r.status_code == 404 and "error" in r.json()
    r = api.get(f"/v2/{name}/status/{'f' * 32}")
    assert r.status_code == 404 and "error" in r.json()

    # Wrong keyword arguments: the handler's TypeError comes back as a FAILED job.
    r = api.post(f"/v2/{name}/runsync", json={"input": {"a": 1}})
    assert r.status_code == 200
    assert r.json()["status"] == "FAILED"
    assert "b" in r.json()["error"]

    # Redeploying changed code under the same config changes what HTTP callers get.
    @Endpoint(name=name, gpu="A100", workers=(0, 1), idle_timeout=5)
    def combine2(a, b, scale=1, tags=()):
        return {"difference": a - b}

    assert combine2.deploy()["action"] == "reused"
    r = api.post(f"/v2/{name}/runsync", json={"input": {"a": 5, "b": 3}})
    assert r.json()["output"] == {"difference": 2}, r.json()


def test_generator_handler_streams_chunks(client, api, name, tmp_path):
    gate = str(tmp_path / "gate")

    @Endpoint(name=name, workers=(0, 1), idle_timeout=5)
    def tokens(n, gate=None):
        yield {"token": 0}
        if gate:
            wait_gate(gate)
        for i in range(1, n):
            yield {"token": i}

    tokens.deploy()

    # runsync: the output is the list of yielded chunks.
    r = api.post(f"/v2/{name}/runsync", json={"input": {"n": 3}})
    assert r.json()["status"] == "COMPLETED", r.json()
    assert r.json()["output"] == [{"token": 0}, {"token": 1}, {"token": 2}]

    # run + stream: the first chunk is visible while the job is still running.
    jid = api.post(f"/v2/{name}/run", json={"input": {"n": 4, "gate": gate}}).json()["id"]

    def first_chunk():
        s = api.get(f"/v2/{name}/stream/{jid}").json()
        return s if s["stream"] else None

    s = wait_for(first_chunk, timeout=30, what="the first chunk")
    assert s["status"] == "IN_PROGRESS", s
    assert s["stream"] == [{"output": {"token": 0}}]

    Path(gate).touch()
    final = poll(api, name, jid)
    assert final["status"] == "COMPLETED"
    assert final["output"] == [{"token": i} for i in range(4)]
    # As on Runpod, each call hands out the chunks not handed out yet; then none, with the
    # final status (which is how Runpod's client knows the stream has ended).
    s = api.get(f"/v2/{name}/stream/{jid}").json()
    assert s == {"status": "COMPLETED", "stream": [{"output": {"token": i}} for i in (1, 2, 3)]}
    assert api.get(f"/v2/{name}/stream/{jid}").json() == {"status": "COMPLETED", "stream": []}
    # ?all=1: every chunk so far. POST works too (Runpod accepts both).
    every = {"status": "COMPLETED", "stream": [{"output": {"token": i}} for i in range(4)]}
    assert api.get(f"/v2/{name}/stream/{jid}", params={"all": "1"}).json() == every
    assert api.post(f"/v2/{name}/stream/{jid}?all=true").json() == every


def test_failures_are_reported_as_failed_jobs(client, api, name):
    @Endpoint(name=name, workers=(0, 1), idle_timeout=5)
    def moody(mode):
        if mode == "raise":
            raise ValueError("bad value 42 from the handler")
        if mode == "set":
            return {1, 2, 3}
        if mode == "object":
            return {"when": object()}
        return {"mode": mode}

    moody.deploy()

    r = api.post(f"/v2/{name}/runsync", json={"input": {"mode": "raise"}})
    assert r.status_code == 200
    failed = r.json()
    assert failed["status"] == "FAILED", failed
    assert isinstance(failed["error"], str)
    assert "bad value 42 from the handler" in failed["error"]
    assert "output" not in failed
    assert failed["workerId"].startswith(name)

    r = api.post(f"/v2/{name}/runsync", json={"input": {"mode": "set"}})
    body = r.json()
    assert body["status"] == "FAILED", body
    assert "not JSON" in body["error"] and "set" in body["error"]

    r = api.post(f"/v2/{name}/runsync", json={"input": {"mode": "object"}})
    assert r.json()["status"] == "FAILED" and "not JSON" in r.json()["error"]

    # /run + /status report the failure the same way.
    jid = api.post(f"/v2/{name}/run", json={"input": {"mode": "raise"}}).json()["id"]
    final = poll(api, name, jid)
    assert final["status"] == "FAILED" and "bad value 42" in final["error"]

    # The worker survived its handler's failures.
    r = api.post(f"/v2/{name}/runsync", json={"input": {"mode": "fine"}})
    assert r.json()["status"] == "COMPLETED" and r.json()["output"] == {"mode": "fine"}


def test_health_counts_workers_and_jobs(client, api, name, tmp_path):
    @Endpoint(name=name, workers=(0, 1), idle_timeout=5)
    def work(mode="ok", gate=None):
        if gate:
            wait_gate(gate)
        if mode == "raise":
            raise RuntimeError("nope")
        return mode

    work.deploy()

    def health():
        r = api.get(f"/v2/{name}/health")
        assert r.status_code == 200, r.text
        return r.json()

    h = health()
    assert set(h) == {"workers", "jobs"}
    assert set(h["workers"]) == {"idle", "initializing", "ready", "running", "throttled",
                                 "unhealthy"}  # fmt: skip
    assert set(h["jobs"]) == {"completed", "failed", "inProgress", "inQueue", "retried"}
    assert all(v == 0 for v in h["workers"].values()), h
    assert all(v == 0 for v in h["jobs"].values()), h

    for _ in range(2):
        assert api.post(f"/v2/{name}/runsync", json={"input": {}}).json()["status"] == "COMPLETED"
    assert (
        api.post(f"/v2/{name}/runsync", json={"input": {"mode": "raise"}}).json()["status"]
        == "FAILED"
    )
    h = health()
    assert h["jobs"] == {"completed": 2, "failed": 1, "inProgress": 0, "inQueue": 0,
                         "retried": 0}  # fmt: skip
    # One warm worker (inside idle_timeout), doing nothing.
    assert h["workers"]["ready"] == 1 and h["workers"]["idle"] == 1, h
    assert h["workers"]["running"] == 0 and h["workers"]["initializing"] == 0, h
    assert h["workers"]["throttled"] == 0 and h["workers"]["unhealthy"] == 0, h

    # One job running, one waiting behind it (max one worker).
    gate = str(tmp_path / "gate")
    busy = api.post(f"/v2/{name}/run", json={"input": {"gate": gate}}).json()["id"]
    wait_for(lambda: status_of(api, name, busy)["status"] == "IN_PROGRESS", what="running")
    queued = api.post(f"/v2/{name}/run", json={"input": {}}).json()["id"]
    h = health()
    assert h["jobs"]["inProgress"] == 1 and h["jobs"]["inQueue"] == 1, h
    assert h["workers"]["running"] == 1 and h["workers"]["ready"] == 1, h
    assert h["workers"]["idle"] == 0, h

    Path(gate).touch()
    assert poll(api, name, busy)["status"] == "COMPLETED"
    assert poll(api, name, queued)["status"] == "COMPLETED"
    h = health()
    assert h["jobs"]["completed"] == 4 and h["jobs"]["failed"] == 1, h
    assert h["jobs"]["inProgress"] == 0 and h["jobs"]["inQueue"] == 0, h

    assert api.get("/v2/no-such-endpoint-xyz/health").status_code == 404


def test_cancel_queued_job_and_purge_queue(client, api, name, tmp_path):
    gate = str(tmp_path / "gate")

    @Endpoint(name=name, workers=(0, 1), idle_timeout=5)
    def step(tag, gate=None):
        print(f"ran {tag}", flush=True)
        if gate:
            wait_gate(gate)
        return tag

    step.deploy()

    def run(tag, **kw):
        r = api.post(f"/v2/{name}/run", json={"input": {"tag": tag, **kw}})
        assert r.status_code == 200, r.text
        return r.json()["id"]

    first = run("first", gate=gate)
    wait_for(lambda: status_of(api, name, first)["status"] == "IN_PROGRESS", what="first runs")
    second = run("second")
    assert status_of(api, name, second)["status"] == "IN_QUEUE"

    r = api.post(f"/v2/{name}/cancel/{second}")
    assert r.status_code == 200, r.text
    assert r.json() == {"id": second, "status": "CANCELLED"}
    # Cancelling again is harmless and reports the same terminal status.
    assert api.post(f"/v2/{name}/cancel/{second}").json()["status"] == "CANCELLED"
    assert api.post(f"/v2/{name}/cancel/{'e' * 32}").status_code == 404

    # Two more wait behind the first; purge removes both and says so.
    third, fourth = run("third"), run("fourth")
    assert api.get(f"/v2/{name}/health").json()["jobs"]["inQueue"] == 2
    r = api.post(f"/v2/{name}/purge-queue")
    assert r.status_code == 200, r.text
    assert r.json()["removed"] == 2, r.json()
    assert api.get(f"/v2/{name}/health").json()["jobs"]["inQueue"] == 0
    for jid in (third, fourth):
        assert status_of(api, name, jid)["status"] == "CANCELLED"
    # Purging an empty queue removes nothing; the running job was not touched.
    assert api.post(f"/v2/{name}/purge-queue").json()["removed"] == 0
    assert status_of(api, name, first)["status"] == "IN_PROGRESS"

    Path(gate).touch()
    assert poll(api, name, first)["output"] == "first"
    # A job submitted after them runs; the cancelled ones never did.
    last = api.post(f"/v2/{name}/runsync", json={"input": {"tag": "last"}}).json()
    assert last["status"] == "COMPLETED" and last["output"] == "last"
    for jid in (second, third, fourth):
        s = status_of(api, name, jid)
        assert s["status"] == "CANCELLED", s
        assert "workerId" not in s and "output" not in s, s
    text = "".join(e["text"] for e in api.get(f"/v1/endpoints/{name}/logs").json())
    assert "ran first" in text and "ran last" in text
    for tag in ("second", "third", "fourth"):
        assert f"ran {tag}" not in text, text


def test_cancel_through_another_endpoints_path_is_refused(client, api, name, tmp_path):
    """A job id belongs to its endpoint: /v2/OTHER/cancel/ID is a 404 and changes nothing."""
    gate = str(tmp_path / "gate")

    @Endpoint(name=name, workers=(0, 1), idle_timeout=5)
    def hold(gate):
        wait_gate(gate)
        return "held"

    hold.deploy()
    other = f"{name}-b"
    assert api.put(f"/v1/endpoints/{other}", json={"idle_timeout": 2}).status_code == 200
    try:
        first = api.post(f"/v2/{name}/run", json={"input": {"gate": gate}}).json()["id"]
        wait_for(lambda: status_of(api, name, first)["status"] == "IN_PROGRESS", what="running")
        second = api.post(f"/v2/{name}/run", json={"input": {"gate": gate}}).json()["id"]
        for ep in (other, "no-such-endpoint"):
            for jid, was in ((second, "IN_QUEUE"), (first, "IN_PROGRESS")):
                r = api.post(f"/v2/{ep}/cancel/{jid}")
                assert r.status_code == 404, r.text
                assert status_of(api, name, jid)["status"] == was, (
                    f"POST /v2/{ep}/cancel/<job of {name}> answered 404 but cancelled the job"
                )
        Path(gate).touch()
        assert poll(api, name, first)["status"] == "COMPLETED"
        assert poll(api, name, second)["status"] == "COMPLETED"
    finally:
        Path(gate).touch()
        api.delete(f"/v1/endpoints/{other}")


# ---------------------------------------------------------------- auth


def test_every_route_but_ping_needs_the_token(server):
    routes = routes_of_http_app()
    paths = {p for _, p in routes}
    # The parse found the route table (guards against this test silently checking nothing).
    for p in ("/ping", "/v2/{name}/run", "/v2/{name}/runsync", "/v2/{name}/status/{job}",
              "/v2/{name}/stream/{job}", "/v2/{name}/cancel/{job}", "/v2/{name}/health",
              "/v2/{name}/purge-queue", "/v1/endpoints", "/v1/endpoints/{name}",
              "/v1/billing", "/v1/events"):  # fmt: skip
        assert p in paths, p
    assert len(routes) >= 19

    bad_headers = [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {server.token}x"},
        {"Authorization": f"Basic {server.token}"},
        {"Authorization": server.token},
        {"Authorization": "Bearer"},
    ]
    with httpx.Client(base_url=server.url, timeout=10) as h:
        for method, path in routes:
            if path == "/ping":
                continue
            url = fill(path)
            for headers in bad_headers:
                with h.stream(method, url, headers=headers, content=b'{"input": {}}') as r:
                    r.read()
                    assert r.status_code == 401, (method, path, headers, r.status_code)
                    assert "error" in json.loads(r.content), (method, path)
                    assert r.headers.get("www-authenticate", "").lower().startswith("bearer")
            # The token in the query string is no substitute for the header.
            r = h.request(method, url + f"?token={server.token}")
            assert r.status_code == 401, (method, path)
            # With the right token, none of them is a 401 (the 401 was about the token).
            good = {"Authorization": f"Bearer {server.token}"}
            with h.stream(method, url, headers=good) as r:
                assert r.status_code != 401, (method, path)

        r = h.get("/ping")
        assert r.status_code == 200 and r.json()["status"] == "ok"
        r = h.get("/v1/info", headers={"Authorization": f"bearer {server.token}"})
        assert r.status_code == 200, "the scheme name is case-insensitive"
        assert "version" in r.json()


# ---------------------------------------------------------------- bad requests


def v2_post_routes() -> list[str]:
    return [p for m, p in routes_of_http_app() if m == "POST" and p.startswith("/v2/")]


def test_malformed_json_gets_a_json_error_and_the_server_lives_on(server, api, echo):
    name = echo
    posts = v2_post_routes()
    assert {"/v2/{name}/run", "/v2/{name}/runsync", "/v2/{name}/cancel/{job}",
            "/v2/{name}/purge-queue"} <= set(posts)  # fmt: skip
    headers = {"Content-Type": "application/json"}
    for path in posts:
        for body in (b'{"input": ', b"{not json}", b"\xff\xfe", b'{"input": {"a": 1}'):
            r = api.post(fill(path, name), content=body, headers=headers)
            assert r.status_code < 500, (path, body, r.status_code, r.text)
            assert r.headers["content-type"].startswith("application/json"), (path, r.text)
            if path.endswith(("/run", "/runsync")):
                assert r.status_code == 400, (path, body, r.text)
                assert "JSON" in r.json()["error"], r.json()
            elif "{job}" in path:
                assert r.status_code == 404 and r.json()["error"], (path, r.text)
    # Management routes that read a body say the same.
    for path in (f"/v1/endpoints/{name}/scale",):
        r = api.post(path, content=b'{"min": ', headers=headers)
        assert r.status_code == 400 and "JSON" in r.json()["error"], r.text
    r = api.put(f"/v1/endpoints/{name}", content=b'{"idle_timeout": ', headers=headers)
    assert r.status_code == 400 and "JSON" in r.json()["error"], r.text

    # Bodies that are JSON but not a job.
    for body in ({}, [], {"inputs": {"a": 1}}, {"input": [1, 2]}, {"input": "text"},
                 {"input": None}, {"input": 3}, "input", None):  # fmt: skip
        for route in ("run", "runsync"):
            r = api.post(f"/v2/{name}/{route}", json=body)
            assert r.status_code == 400, (route, body, r.text)
            assert '"input"' in r.json()["error"], r.json()
    # An empty body is not a job either.
    r = api.post(f"/v2/{name}/run")
    assert r.status_code == 400 and "input" in r.json()["error"]

    # None of that left a job behind.
    jobs = api.get("/v1/jobs", params={"endpoint": name}).json()
    assert jobs == [], jobs

    # The server is fine and the endpoint works.
    assert httpx.get(server.url + "/ping").status_code == 200
    r = api.post(f"/v2/{name}/runsync", json={"input": {"a": 1, "b": [2, 3]}})
    assert r.json()["status"] == "COMPLETED" and r.json()["output"] == {"a": 1, "b": [2, 3]}


def test_unknown_endpoint_is_404_everywhere(api, server):
    ghost = "ghost-endpoint-that-does-not-exist"
    for method, path in routes_of_http_app():
        if "{name}" not in path or (method, path) == ("PUT", "/v1/endpoints/{name}"):
            continue
        kw = {}
        if method == "POST":
            kw["json"] = {"input": {}, "min": 0, "max": 1}
        r = api.request(method, fill(path, ghost), **kw)
        assert r.status_code == 404, (method, path, r.status_code, r.text)
        assert r.json()["error"], (method, path)
    assert ghost in api.post(f"/v2/{ghost}/runsync", json={"input": {}}).json()["error"]
    assert ghost not in [e["name"] for e in api.get("/v1/endpoints").json()]
    # Unknown paths and wrong methods are JSON errors too.
    r = api.get("/v2/x")
    assert r.status_code == 404 and r.json()["error"]
    r = api.get(f"/v2/{ghost}/run")
    assert r.status_code == 405 and r.json()["error"]
    assert httpx.get(server.url + "/ping").status_code == 200


def test_bad_wait_param_does_not_leave_a_job_behind(api, echo):
    name = echo
    r = api.post(f"/v2/{name}/runsync", params={"wait": "soon"}, json={"input": {"x": 1}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]
    # The caller got no job id, so no job may exist that it cannot see or cancel.
    jobs = api.get("/v1/jobs", params={"endpoint": name}).json()
    assert jobs == [], f"a rejected runsync still queued a job: {jobs}"


def test_runsync_wait_returns_early_with_the_job_id(api, client, name, tmp_path):
    gate = str(tmp_path / "gate")

    @Endpoint(name=name, workers=(0, 1), idle_timeout=5)
    def slow(gate):
        wait_gate(gate)
        return "late"

    slow.deploy()
    t0 = time.monotonic()
    r = api.post(f"/v2/{name}/runsync", params={"wait": 300}, json={"input": {"gate": gate}})
    assert time.monotonic() - t0 < 20
    body = r.json()
    assert r.status_code == 200 and body["status"] in ("IN_QUEUE", "IN_PROGRESS"), body
    Path(gate).touch()
    assert poll(api, name, body["id"])["output"] == "late"


# ---------------------------------------------------------------- management


def test_put_creates_an_endpoint_without_handler(api, name):
    settings = {"gpu": "A100", "workers": [0, 1], "idle_timeout": 2}
    r = api.put(f"/v1/endpoints/{name}", json=settings)
    assert r.status_code == 200, r.text
    assert r.json()["action"] == "created" and r.json()["name"] == name
    assert api.put(f"/v1/endpoints/{name}", json=settings).json()["action"] == "reused"

    ep = api.get(f"/v1/endpoints/{name}").json()
    assert ep["name"] == name and ep["has_handler"] is False
    assert ep["config"]["gpu"] == ["A100"] and ep["config"]["idle_timeout"] == 2
    assert [w["state"] for w in ep["workers"]] == ["Idle"]

    # A REST job cannot run without a function; the answer says how to give it one.
    for route in ("run", "runsync"):
        r = api.post(f"/v2/{name}/{route}", json={"input": {"x": 1}})
        assert r.status_code == 400, r.text
        msg = r.json()["error"]
        assert "handler" in msg and "deploy" in msg, msg
    assert api.get("/v1/jobs", params={"endpoint": name}).json() == []


def test_http_calls_to_class_and_cell_endpoints_get_advice_that_can_be_followed(client, api, name):
    """A class has no function to deploy: the refusal says what can be done instead. A name
    that a class takes over no longer answers HTTP with an older function."""

    @Endpoint(name=name)
    def f(x=0):
        return x

    f.deploy()
    assert api.post(f"/v2/{name}/runsync", json={"input": {"x": 3}}).json()["output"] == 3

    @Endpoint(name=name)
    class Model:
        def predict(self, x):
            return x

    Model.deploy()
    r = api.post(f"/v2/{name}/runsync", json={"input": {"x": 1}})
    assert r.status_code == 400, r.text
    msg = r.json()["error"]
    assert "serves a class" in msg and "obj.method(...)" in msg and "fn.deploy" not in msg, msg

    client.deploy({"name": name + "-cells"}, changes={}, serves="cells")
    r = api.post(f"/v2/{name}-cells/runsync", json={"input": {}})
    assert r.status_code == 400, r.text
    msg = r.json()["error"]
    assert "%%flash cells" in msg and "@Endpoint(name=...)" in msg, msg


def test_put_rejects_bad_settings(api, name):
    base = {"workers": [0, 1], "idle_timeout": 2}
    cases = [
        ({**base, "idle_timeout": 0}, "idle_timeout"),
        ({**base, "idle_timeout": "soon"}, "idle_timeout"),
        ({**base, "workers": [3, 1]}, "workers"),
        ({**base, "gpu": "NoSuchGPU-9000"}, "NoSuchGPU-9000"),
        ({**base, "gpu_count": 99}, "gpu_count"),
        ({**base, "colour": "blue"}, "colour"),
        ({**base, "env": {"K": 1}}, "env"),
        ([1, 2], "JSON object"),
        ("text", "JSON object"),
    ]
    for body, word in cases:
        r = api.put(f"/v1/endpoints/{name}", json=body)
        assert r.status_code == 400, (body, r.status_code, r.text)
        assert word in r.json()["error"], (body, r.json())
    # None of them created the endpoint.
    assert api.get(f"/v1/endpoints/{name}").status_code == 404
    # A name the endpoint may not have.
    r = api.put("/v1/endpoints/bad%20name!", json=base)
    assert r.status_code == 400 and "name" in r.json()["error"], r.text

    # A valid endpoint rejects a bad update and keeps its settings.
    assert api.put(f"/v1/endpoints/{name}", json=base).status_code == 200
    r = api.put(f"/v1/endpoints/{name}", json={**base, "idle_timeout": -1})
    assert r.status_code == 400
    assert api.get(f"/v1/endpoints/{name}").json()["config"]["idle_timeout"] == 2


def test_management_routes(client, server, api, name):
    marker = f"hello-from-{name}"

    @Endpoint(name=name, gpu="A100", workers=(0, 1), idle_timeout=2)
    def greet(who):
        print(marker, who, flush=True)
        return f"hi {who}"

    greet.deploy()
    r = api.post(f"/v2/{name}/runsync", json={"input": {"who": "ada"}})
    assert r.json()["output"] == "hi ada", r.json()

    # Listing: the endpoint, its config, its workers and their states.
    listing = api.get("/v1/endpoints").json()
    ep = next(e for e in listing if e["name"] == name)
    assert ep["has_handler"] is True
    assert ep["hardware"] == "A100" and ep["emulated"] is True
    assert [w["state"] for w in ep["workers"]] == ["Running"]
    w = ep["workers"][0]
    assert w["id"].startswith(name) and w["pid"] and "emulated" in w["hardware"]
    assert ep["health"]["jobs"]["completed"] == 1
    assert api.get(f"/v1/endpoints/{name}").json()["name"] == name

    # Logs: what the handler printed, with the job it belongs to.
    logs = api.get(f"/v1/endpoints/{name}/logs").json()
    mine = [e for e in logs if marker in e["text"]]
    assert mine and mine[0]["job"] == r.json()["id"] and mine[0]["stream"] == "stdout"
    assert "ada" in mine[0]["text"]
    assert api.get(f"/v1/endpoints/{name}/logs", params={"tail": 0}).json() == []
    assert api.get(f"/v1/endpoints/{name}/logs", params={"tail": "x"}).status_code == 400

    # PUT updates the settings and keeps the handler.
    r = api.put(f"/v1/endpoints/{name}", json={"gpu": "A100", "workers": [0, 1],
                                                "idle_timeout": 3})  # fmt: skip
    assert r.status_code == 200 and r.json()["action"] == "updated", r.text
    assert api.get(f"/v1/endpoints/{name}").json()["config"]["idle_timeout"] == 3
    r = api.post(f"/v2/{name}/runsync", json={"input": {"who": "bob"}})
    assert r.json()["output"] == "hi bob", r.json()

    # Scale: min 1 keeps a worker up; max 2 gives two slots.
    r = api.post(f"/v1/endpoints/{name}/scale", json={"min": 1, "max": 2})
    assert r.status_code == 200 and r.json()["action"] == "updated", r.text
    ep = api.get(f"/v1/endpoints/{name}").json()
    assert (ep["config"]["workers_min"], ep["config"]["workers_max"]) == (1, 2)
    assert len(ep["workers"]) == 2
    for bad in ({"min": 2, "max": 1}, {"min": 1}, {"min": "a", "max": 2}, [1, 2]):
        r = api.post(f"/v1/endpoints/{name}/scale", json=bad)
        assert r.status_code == 400 and r.json()["error"], (bad, r.text)
    assert api.get(f"/v1/endpoints/{name}").json()["config"]["workers_max"] == 2

    # Scale back to zero: the warm worker goes once idle_timeout (3 s) has passed.
    r = api.post(f"/v1/endpoints/{name}/scale", json={"min": 0, "max": 1})
    assert r.status_code == 200

    def all_idle():
        e = api.get(f"/v1/endpoints/{name}").json()
        return e if [w["state"] for w in e["workers"]] == ["Idle"] else None

    ep = wait_for(all_idle, timeout=30, what="the worker to scale down")

    # Billing: whole seconds at the A100's per-second price, flagged as an estimate.
    b = api.get("/v1/billing").json()
    assert b["currency"] == "USD" and b["estimate"] is True
    assert isinstance(b["total"], (int, float)) and b["prices_as_of"]
    mine = b["endpoints"][name]
    assert mine["estimate"] is True and mine["hardware"] == "A100"
    assert mine["billed_seconds"] >= 1 and isinstance(mine["billed_seconds"], int)
    assert mine["cost"] == pytest.approx(mine["billed_seconds"] * mine["price_per_second"])
    assert mine["cost"] > 0 and b["total"] >= mine["cost"] - 1e-9
    assert ep["cost"] == pytest.approx(mine["cost"])

    # Delete: gone from everywhere, its worker processes stopped.
    r = api.post(f"/v2/{name}/runsync", json={"input": {"who": "cy"}})
    pid = api.get(f"/v1/endpoints/{name}").json()["workers"][0]["pid"]
    assert pid
    r = api.delete(f"/v1/endpoints/{name}")
    assert r.status_code == 200 and r.json() == {"deleted": name}
    assert api.get(f"/v1/endpoints/{name}").status_code == 404
    assert name not in [e["name"] for e in api.get("/v1/endpoints").json()]
    assert name not in api.get("/v1/billing").json()["endpoints"]
    assert api.post(f"/v2/{name}/runsync", json={"input": {"who": "x"}}).status_code == 404
    assert api.delete(f"/v1/endpoints/{name}").status_code == 404

    def gone():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie waiting for its parent to reap it has stopped too.
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
        except OSError:
            return True

    wait_for(gone, timeout=15, what="the deleted endpoint's worker to exit")
