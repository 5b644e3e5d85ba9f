"""The HTTP API's limits, found by attacking it: what a request may hold, checked at the door
before anything is recorded, and what a stored value may not break afterwards.

- JSON nested too deeply (it used to wedge a worker and strand a job): 400, nothing queued.
- NaN, Infinity and numbers that overflow a float: 400 at the door; endpoint settings refuse
  them on every path; outputs holding them render as null instead of breaking every view.
- Body sizes: 413 from the Content-Length or while the body streams in; finished jobs let go
  of their inputs; a job too large for a worker's frame fails with that reason.

Real control planes over real HTTP (see conftest.py), as in test_http_api.py.
"""

from __future__ import annotations

import json
import math
import socket
import sqlite3
import threading

import httpx
import psutil
import pytest
from conftest import Server, free_port, poll, use_server, wait_for

from flash_jupyter import Endpoint
from flash_jupyter.config import EndpointConfig
from flash_jupyter.errors import ConfigError

MiB = 1024 * 1024
DEPTH = 64  # the documented nesting limit of a request body (http_app.MAX_JSON_DEPTH)
RUN_LIMIT, RUNSYNC_LIMIT = 10 * MiB, 20 * MiB  # documented defaults (Runpod's, in MiB)
MAX_META = 64 * MiB  # a worker's cap on a frame's metadata (protocol.MAX_META)


# ---------------------------------------------------------------- helpers


def jobs_of(api: httpx.Client, name: str) -> list[dict]:
    r = api.get("/v1/jobs", params={"endpoint": name})
    assert r.status_code == 200, r.text
    return r.json()


def nested(depth: int) -> dict:
    """An object whose nesting is ``depth`` levels (itself included)."""
    v: dict = {}
    for _ in range(depth - 1):
        v = {"a": v}
    return v


def raw_post(server: Server, path: str, headers: dict[str, str], body: bytes = b"",
             timeout: float = 10) -> tuple[int, dict]:  # fmt: skip
    """POST over a bare socket (to send what httpx will not: a Content-Length with no
    body behind it). Returns the status and the JSON answer."""
    head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}",
            f"Authorization: Bearer {server.token}", "Content-Type: application/json",
            "Connection: close"]  # fmt: skip
    head += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, f"connection closed without an answer: {data!r}"
            data += chunk
        top, _, rest = data.partition(b"\r\n\r\n")
        lines = top.decode().split("\r\n")
        status = int(lines[0].split()[1])
        length = next(int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length"))
        while len(rest) < length:
            chunk = s.recv(65536)
            assert chunk, "connection closed in the middle of the answer"
            rest += chunk
    return status, json.loads(rest[:length])


# ---------------------------------------------------------------- nesting depth


def test_deeply_nested_input_is_refused_and_the_endpoint_serves_on(server, api, echo):
    name = echo
    for route in ("run", "runsync"):
        r = api.post(f"/v2/{name}/{route}", json={"input": nested(500)})
        assert r.status_code == 400, (route, r.status_code, r.text)
        msg = r.json()["error"]
        assert "nested" in msg and str(DEPTH) in msg, msg
    # Deep arrays, and nesting hidden past the point where json.loads gives up.
    deep = b'{"input": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}"
    r = api.post(f"/v2/{name}/run", content=deep, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and str(DEPTH) in r.json()["error"], r.text
    # Brackets inside strings are text, not nesting.
    r = api.post(f"/v2/{name}/runsync", json={"input": {"s": "[{" * 1000}})
    assert r.status_code == 200 and r.json()["output"] == {"s": "[{" * 1000}, r.text
    # Exactly at the limit (the body is one level, "input" the next): accepted and run.
    at_limit = nested(DEPTH - 1)
    r = api.post(f"/v2/{name}/runsync", json={"input": at_limit})
    assert r.status_code == 200 and r.json()["status"] == "COMPLETED", r.text
    assert r.json()["output"] == at_limit
    r = api.post(f"/v2/{name}/runsync", json={"input": nested(DEPTH)})
    assert r.status_code == 400 and str(DEPTH) in r.json()["error"], r.text

    # Nothing was stranded: only the two jobs that ran, both finished; the next one runs.
    jobs = jobs_of(api, name)
    assert [j["status"] for j in jobs] == ["COMPLETED", "COMPLETED"], jobs
    health = api.get(f"/v2/{name}/health").json()
    assert health["jobs"]["inQueue"] == 0 and health["jobs"]["inProgress"] == 0, health
    r = api.post(f"/v2/{name}/run", json={"input": {"x": 1}})
    assert r.status_code == 200, r.text
    assert poll(api, name, r.json()["id"])["output"] == {"x": 1}


# ---------------------------------------------------------------- NaN and Infinity


def test_non_finite_numbers_are_refused_at_the_door(server, api, echo):
    name = echo
    headers = {"Content-Type": "application/json"}
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1E+400"):
        body = b'{"input": {"x": [1, ' + literal + b"]}}"
        for route in ("run", "runsync"):
            r = api.post(f"/v2/{name}/{route}", content=body, headers=headers)
            assert r.status_code == 400, (literal, route, r.text)
            assert "non-finite" in r.json()["error"], r.json()
    # Strings that spell them are fine.
    r = api.post(f"/v2/{name}/runsync", json={"input": {"x": "NaN", "y": 1.5e300}})
    assert r.json()["output"] == {"x": "NaN", "y": 1.5e300}, r.text

    # Endpoint settings over HTTP: refused, nothing created or changed.
    other = f"{name}-cfg"
    try:
        settings = (
            b'"execution_timeout": Infinity',
            b'"execution_timeout": NaN',
            b'"idle_timeout": 1e999',
            b'"execution_timeout": 1' + b"0" * 400,
        )
        for setting in settings:
            body = b'{"workers": [0, 1], ' + setting + b"}"
            r = api.put(f"/v1/endpoints/{other}", content=body, headers=headers)
            assert r.status_code == 400, (setting, r.text)
        assert api.get(f"/v1/endpoints/{other}").status_code == 404
        r = api.post(f"/v1/endpoints/{name}/scale", content=b'{"min": 0, "max": Infinity}',
                     headers=headers)  # fmt: skip
        assert r.status_code == 400, r.text
    finally:
        api.delete(f"/v1/endpoints/{other}")

    # Query numbers are checked before anything is queued.
    for wait in ("nan", "inf", "-inf", "-1", "1e999", "soon"):
        r = api.post(f"/v2/{name}/runsync", params={"wait": wait}, json={"input": {"x": 2}})
        assert r.status_code == 400 and "wait" in r.json()["error"], (wait, r.text)
    for param, path in (("tail", f"/v1/endpoints/{name}/logs"), ("limit", "/v1/jobs")):
        for bad in ("nan", "inf", "1e3", "-1", "x"):
            r = api.get(path, params={param: bad})
            assert r.status_code == 400 and param in r.json()["error"], (param, bad, r.text)

    # Every view still answers, and no job was left behind by the refusals.
    assert api.get("/v1/endpoints").status_code == 200
    jobs = jobs_of(api, name)
    assert [j["status"] for j in jobs] == ["COMPLETED"], jobs


def test_endpoint_settings_refuse_non_finite_numbers_on_every_path():
    """EndpointConfig is what the decorator, HTTP PUT, wire deploy and scale all go through."""
    for bad in (math.inf, -math.inf, math.nan, 10**400):
        with pytest.raises(ConfigError, match="execution_timeout"):
            EndpointConfig.build("x", execution_timeout=bad)
        with pytest.raises(ConfigError, match="idle_timeout"):
            EndpointConfig.build("x", idle_timeout=bad)
        with pytest.raises(ConfigError):
            EndpointConfig.from_dict({"name": "x", "execution_timeout": bad})
        with pytest.raises(ConfigError):
            Endpoint(name="x", execution_timeout=bad)
    for bad in (math.inf, math.nan):
        with pytest.raises(ConfigError):
            EndpointConfig.from_dict({"name": "x", "workers_min": 0, "workers_max": bad})
        with pytest.raises(ConfigError):
            EndpointConfig.build("x", gpu_count=bad)
        with pytest.raises(ConfigError):
            EndpointConfig.build("x", max_concurrency=bad)
    ok = EndpointConfig.build("x", execution_timeout=2**60, idle_timeout=3600)
    assert ok.execution_timeout == float(2**60)


def test_non_finite_outputs_render_as_null_and_break_no_view(server, api, client, name):
    @Endpoint(name=name, workers=(0, 1), idle_timeout=5)
    def odd(kind="plain"):
        nan, inf = float("nan"), float("inf")
        if kind == "stream":
            yield {"chunk": nan}
            yield {"chunk": 1.0}
            return
        yield {"nan": nan, "inf": [inf, -inf], "ok": 1.5, "deep": {"x": nan}}

    odd.deploy()
    # The live event stream carries the same payloads: strict JSON too.
    events: list[dict] = []
    failure: list[BaseException] = []

    def listen() -> None:
        try:
            with server.http() as h, h.stream("GET", "/v1/events", timeout=30) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        events.append(json.loads(line[5:], parse_constant=pytest.fail))
                        e = events[-1]
                        if e.get("endpoint") == name and e.get("status") == "COMPLETED":
                            return
        except BaseException as e:
            failure.append(e)

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    wait_for(lambda: events or failure, what="the event stream's snapshot")

    want = [{"nan": None, "inf": [None, None], "ok": 1.5, "deep": {"x": None}}]
    r = api.post(f"/v2/{name}/runsync", json={"input": {}})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "COMPLETED" and r.json()["output"] == want, r.json()
    jid = r.json()["id"]
    assert api.get(f"/v2/{name}/status/{jid}").json()["output"] == want
    listener.join(30)
    assert not failure, failure
    done = [e for e in events if e.get("id") == jid and e.get("status") == "COMPLETED"]
    assert done and done[0]["output"] == want, events
    r = api.post(f"/v2/{name}/run", json={"input": {"kind": "stream"}})
    sid = r.json()["id"]
    assert poll(api, name, sid)["output"] == [{"chunk": None}, {"chunk": 1.0}]
    r = api.get(f"/v2/{name}/stream/{sid}")
    assert r.status_code == 200, r.text
    assert r.json()["stream"] == [{"output": {"chunk": None}}, {"output": {"chunk": 1.0}}]
    # The views every caller shares: no NaN in them, and they still answer.
    for params in ({}, {"endpoint": name}):
        r = api.get("/v1/jobs", params=params)
        assert r.status_code == 200, r.text
        json.loads(r.text, parse_constant=pytest.fail)  # strict JSON: no NaN, no Infinity
    assert {j["id"] for j in jobs_of(api, name)} == {jid, sid}
    assert api.get(f"/v1/endpoints/{name}").status_code == 200


def test_endpoint_stored_with_infinity_survives_a_restart(tmp_path, monkeypatch):
    """Settings written by an older version (which let Infinity through) are repaired at
    start-up, with a note in the endpoint's log, instead of breaking start-up or views."""
    s = Server(tmp_path / "cp", "tok-" + "x" * 16, free_port(), free_port())
    s.data_dir.mkdir()
    try:
        s.start()
        with s.http() as h:
            r = h.put("/v1/endpoints/legacy", json={"workers": [0, 1], "execution_timeout": 5})
            assert r.status_code == 200, r.text
        s.stop()
        db = sqlite3.connect(s.data_dir / "flash.db")
        (cfg,) = db.execute("SELECT config FROM endpoints WHERE name='legacy'").fetchone()
        cfg = json.loads(cfg)
        cfg["execution_timeout"], cfg["idle_timeout"] = math.inf, math.nan
        with db:
            db.execute("UPDATE endpoints SET config=? WHERE name='legacy'", (json.dumps(cfg),))
        db.close()

        s.start()
        with s.http() as h:
            r = h.get("/v1/endpoints")
            assert r.status_code == 200, r.text
            (ep,) = [e for e in r.json() if e["name"] == "legacy"]
            assert ep["config"]["execution_timeout"] is None, ep["config"]
            assert ep["config"]["idle_timeout"] == 60, ep["config"]
            notes = " ".join(e["text"] for e in h.get("/v1/endpoints/legacy/logs").json())
            assert "execution_timeout" in notes and "idle_timeout" in notes, notes
            assert h.get("/v1/jobs").status_code == 200
        # The repair was saved: the next start reads clean settings.
        s.stop()
        db = sqlite3.connect(s.data_dir / "flash.db")
        (cfg,) = db.execute("SELECT config FROM endpoints WHERE name='legacy'").fetchone()
        db.close()
        assert "Infinity" not in cfg and "NaN" not in cfg, cfg
    finally:
        s.stop()


# ---------------------------------------------------------------- body size


def test_body_size_limits_are_enforced_while_reading(server, api, echo):
    name = echo
    headers = {"Content-Type": "application/json"}

    def body_of(size: int) -> bytes:
        head, tail = b'{"input": {"s": "', b'"}}'
        return head + b"x" * (size - len(head) - len(tail)) + tail

    # Declared too large: refused from the header alone, before any body is sent.
    for route, limit in (("run", RUN_LIMIT), ("runsync", RUNSYNC_LIMIT)):
        status, answer = raw_post(server, f"/v2/{name}/{route}",
                                  {"Content-Length": str(50_000_000)})  # fmt: skip
        assert status == 413, answer
        assert str(limit) in answer["error"] and "50000000" in answer["error"], answer

    # Sent with a Content-Length just over the limit.
    r = api.post(f"/v2/{name}/run", content=body_of(RUN_LIMIT + 1), headers=headers)
    assert r.status_code == 413, r.text[:300]
    assert str(RUN_LIMIT) in r.json()["error"], r.json()

    # Chunked, no Content-Length: counted as it streams in.
    def chunks(total: int, size: int = 256 * 1024):
        yield b'{"input": {"s": "'
        for _ in range(total // size):
            yield b"x" * size
        yield b'"}}'

    r = api.post(f"/v2/{name}/run", content=chunks(RUN_LIMIT + MiB), headers=headers)
    assert r.status_code == 413, r.text[:300]
    assert str(RUN_LIMIT) in r.json()["error"], r.json()

    # Endpoint settings are small: 1 MiB.
    r = api.put(f"/v1/endpoints/{name}", content=b" " * (MiB + 1), headers=headers)
    assert r.status_code == 413 and str(MiB) in r.json()["error"], r.text[:300]

    # /runsync takes bodies /run refuses (Runpod's 10 and 20 MB).
    r = api.post(f"/v2/{name}/runsync", content=body_of(RUN_LIMIT + MiB), headers=headers)
    assert r.status_code == 200 and r.json()["status"] == "COMPLETED", r.text[:300]
    assert len(r.json()["output"]["s"]) > RUN_LIMIT

    # Nothing refused left a job; the endpoint serves on.
    jobs = jobs_of(api, name)
    assert [j["status"] for j in jobs] == ["COMPLETED"], jobs
    r = api.post(f"/v2/{name}/runsync", json={"input": {"x": 3}})
    assert r.json()["output"] == {"x": 3}, r.text


def test_finished_jobs_let_go_of_their_inputs(own_server, monkeypatch, name):
    """A finished job keeps its outcome, not its input: memory does not grow per job."""
    s = own_server()
    use_server(s, monkeypatch)

    @Endpoint(name=name, workers=(0, 1), idle_timeout=30)
    def size(s):
        return len(s)

    size.deploy()
    proc = psutil.Process(s.info()["pid"])
    n, each = 8, 9 * MiB
    with s.http() as h:

        def one(i: int) -> None:
            r = h.post(f"/v2/{name}/run", json={"input": {"s": chr(97 + i) * each}})
            assert r.status_code == 200, r.text
            assert poll(h, name, r.json()["id"])["output"] == each

        one(0)  # the first settles the allocator at what one job needs
        one(1)
        before = proc.memory_info().rss
        for i in range(2, 2 + n):
            one(i)
        grown = proc.memory_info().rss - before
    # Kept inputs would be n * 9 MiB (72 MiB); allow half that for allocator noise.
    assert grown < n * each / 2, f"control plane grew {grown / MiB:.1f} MiB over {n} jobs"


def test_a_job_too_large_for_a_worker_fails_with_that_reason(own_server, monkeypatch, name):
    """A body limit raised past what a worker's frame can carry: the job fails at dispatch,
    naming its size and the limit, and the worker is not crashed by it."""
    limit = MAX_META + 8 * MiB
    s = own_server(FLASH_JUPYTER_MAX_BODY_BYTES=str(limit))
    use_server(s, monkeypatch)

    @Endpoint(name=name, workers=(0, 1), idle_timeout=30)
    def size(s):
        return len(s)

    size.deploy()
    with s.http() as h:
        first = h.post(f"/v2/{name}/runsync", json={"input": {"s": "ab"}}).json()
        assert first["output"] == 2, first
        big = b'{"input": {"s": "' + b"x" * (MAX_META + MiB) + b'"}}'
        r = h.post(f"/v2/{name}/run", content=big, headers={"Content-Type": "application/json"})
        del big
        assert r.status_code == 200, r.text[:300]
        final = poll(h, name, r.json()["id"])
        assert final["status"] == "FAILED", final
        err = final["error"]
        assert "too large" in err and str(MAX_META) in err, err
        assert "exited" not in err, err
        # The worker never saw it: not restarted, not unhealthy; the next job runs on it.
        health = h.get(f"/v2/{name}/health").json()
        assert health["workers"]["unhealthy"] == 0 and health["jobs"]["inProgress"] == 0, health
        r = h.post(f"/v2/{name}/runsync", json={"input": {"s": "abc"}})
        assert r.json()["output"] == 3, r.text
        assert r.json()["workerIncarnation"] == first["workerIncarnation"], r.json()
        notes = " ".join(e["text"] for e in h.get(f"/v1/endpoints/{name}/logs").json())
        assert "restarting" not in notes, notes

        # The variable sets the limit of both job routes, and the 413 says where it comes from.
        status, answer = raw_post(s, f"/v2/{name}/runsync", {"Content-Length": str(limit + 1)})
        assert status == 413 and str(limit) in answer["error"], answer
        assert "FLASH_JUPYTER_MAX_BODY_BYTES" in answer["error"], answer


# ---------------------------------------------------------------- the core, in process


class _NoProvider:
    """The control plane's core needs a provider only to start workers; these tests don't."""

    def describe(self) -> dict:
        return {"provider": "none"}


class _BrokenConn:
    """A worker connection whose send raises (an encoding failure, say)."""

    def send(self, meta: dict, bufs: list = ()) -> None:
        raise RuntimeError("cannot encode this frame")


@pytest.fixture
def core(tmp_path):
    from flash_jupyter.server import model as m
    from flash_jupyter.server.control import ControlPlane
    from flash_jupyter.server.store import Store

    store = Store(tmp_path / "flash.db")
    cp = ControlPlane(store, _NoProvider(), token="t", wire_addr=("127.0.0.1", 0))
    ep = m.EndpointState(EndpointConfig.build("core"), handler="fnhash")
    cp.endpoints["core"] = ep
    cp._ensure_slots(ep)
    yield cp, ep
    store.close()


def test_a_job_the_store_cannot_take_leaves_nothing_behind(core):
    """Anything that fails while recording a job fails the submission, with no queued id
    that nobody was told of (how a deeply nested input once stranded a job)."""
    cp, ep = core
    with pytest.raises(RecursionError):
        cp.submit("core", "json", {"input": nested(5000)})
    assert cp.jobs == {} and list(ep.queue) == []
    job = cp.submit("core", "json", {"input": {"x": 1}})
    assert list(ep.queue) == [job.id] and cp.find_job(job.id) is job


def test_a_job_that_cannot_be_sent_fails_and_frees_its_worker(core):
    from flash_jupyter.server import model as m

    cp, ep = core
    w = ep.workers["core-1"]
    w.handle, w.conn, w.state, w.fns = "handle", _BrokenConn(), m.RUNNING, {"fnhash"}
    job = cp.submit("core", "json", {"input": {"x": 1}})
    cp._pump(ep)
    assert job.status == "FAILED", job
    assert "could not be sent" in job.error["message"], job.error
    assert "cannot encode this frame" in job.error["message"], job.error
    assert w.jobs == set() and list(ep.queue) == [] and ep.failed == 1
    assert "input" not in job.body  # over: its input is let go
    # The slot is free for the next job (which fails the same way here, visibly).
    nxt = cp.submit("core", "json", {"input": {"x": 2}})
    cp._pump(ep)
    assert nxt.status == "FAILED" and w.jobs == set()
