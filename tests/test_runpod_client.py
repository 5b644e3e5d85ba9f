"""The control plane driven only through Runpod's own Python package (``runpod`` on PyPI).

``runpod.api_key`` is the token and ``runpod.endpoint_url_base`` the control plane's URL plus
``/v2``; from there on every call is Runpod's code, unchanged: ``Endpoint`` (``run_sync``,
``run`` + ``status`` + ``output``, ``health``, ``purge_queue``, ``cancel``, ``stream``) and
``AsyncioEndpoint``. Endpoints are deployed with this project's ``@Endpoint`` (the one thing
Runpod's package cannot do here). Webhooks go to a small HTTP server the test starts on
127.0.0.1; waits are on conditions with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import use_server, wait_for

from flash_jupyter import Endpoint


def _import_runpod():
    """Runpod's package, imported without its side effect on logging: one of its modules calls
    ``logging.basicConfig(level=INFO)``, which would print every httpx request of every later
    test in this session on stderr."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        return pytest.importorskip("runpod")
    finally:
        root.setLevel(level)
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)


runpod = _import_runpod()

FINAL = {"COMPLETED", "FAILED", "TIMED_OUT", "CANCELLED"}


# ---------------------------------------------------------------- helpers


@pytest.fixture
def rp(server, monkeypatch):
    """Runpod's package pointed at the session's control plane."""
    monkeypatch.setattr(runpod, "api_key", server.token)
    monkeypatch.setattr(runpod, "endpoint_url_base", server.url + "/v2")
    return runpod


def point_runpod_at(s, monkeypatch) -> None:
    monkeypatch.setattr(runpod, "api_key", s.token)
    monkeypatch.setattr(runpod, "endpoint_url_base", s.url + "/v2")


def wait_gate(gate: str, limit: float = 60) -> None:
    """Block (on the worker) until the file ``gate`` exists: a deterministic barrier."""
    import os
    import time

    t0 = time.monotonic()
    while not os.path.exists(gate):
        if time.monotonic() - t0 > limit:
            raise TimeoutError(f"gate {gate} never opened")
        time.sleep(0.02)


def get(ep, path: str) -> dict:
    """A GET through Runpod's own HTTP client (its session, its headers)."""
    return ep.rp_client.get(f"{ep.endpoint_id}/{path}")


def status_of(ep, job_id: str) -> dict:
    return get(ep, f"status/{job_id}")


def wait_status(ep, job_id: str, want: set[str] = FINAL, timeout: float = 60) -> dict:
    def check():
        s = status_of(ep, job_id)
        return s if s["status"] in want else None

    return wait_for(check, timeout=timeout, what=f"job {job_id} to be {sorted(want)}")


def refused(call) -> str:
    """The 400 that Runpod's client raises for ``call``; its error message."""
    with pytest.raises(requests.HTTPError) as e:
        call()
    assert e.value.response.status_code == 400, e.value.response.text
    return e.value.response.json()["error"]


def job_counts(ep) -> dict:
    return ep.health()["jobs"]


class Hooks:
    """A webhook receiver on 127.0.0.1: records each POST; answers from ``codes`` (then 200);
    with ``hold`` set, keeps each request waiting until it is released."""

    def __init__(self, codes: tuple[int, ...] = (), hold: bool = False):
        self.calls: list[dict[str, Any]] = []
        self.codes = list(codes)
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.arrived = threading.Event()
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n)
                hooks.calls.append({"path": self.path, "body": json.loads(body),
                                    "type": self.headers.get("Content-Type")})  # fmt: skip
                hooks.arrived.set()
                hooks.release.wait(60)
                code = hooks.codes.pop(0) if hooks.codes else 200
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hooks():
    made: list[Hooks] = []

    def factory(*codes: int, hold: bool = False) -> Hooks:
        h = Hooks(codes, hold)
        made.append(h)
        return h

    yield factory
    for h in made:
        h.close()


def deploy_echo(name: str) -> None:
    @Endpoint(name=name, workers=(0, 1), idle_timeout=30)
    def echo(**kw):
        if kw.get("mode") == "raise":
            raise ValueError(f"bad value {kw.get('x')} from the handler")
        return {"got": kw}

    echo.deploy()


def deploy_gated(name: str, log: Path | None = None) -> None:
    """One worker, one job at a time: a job with ``gate`` waits for that file; each job
    appends its ``tag`` to ``log`` when it runs."""

    @Endpoint(name=name, workers=(0, 1), idle_timeout=30)
    def gated(tag="", gate=None, sleep=0):
        import time

        if gate:
            wait_gate(gate)
        if sleep:
            time.sleep(sleep)
        if log is not None:
            with open(log, "a") as f:
                f.write(tag + "\n")
        return tag

    gated.deploy()


# ---------------------------------------------------------------- the sync client


def test_run_sync_run_status_output_and_health(client, rp, name):
    deploy_echo(name)
    ep = rp.Endpoint(name)

    assert ep.run_sync({"x": 7}, timeout=60) == {"got": {"x": 7}}
    job = ep.run({"input": {"x": 8}})
    assert job.status() in {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"}
    assert job.output(timeout=60) == {"got": {"x": 8}}
    assert job.status() == "COMPLETED"

    health = ep.health()
    assert set(health) == {"workers", "jobs"}, health
    assert health["jobs"]["completed"] >= 2 and health["workers"]["ready"] == 1, health


def test_failed_job_error_is_runpods_json_string(client, rp, name):
    deploy_echo(name)
    ep = rp.Endpoint(name)
    # run_sync hands back the output, which a failed job does not have (Runpod's client).
    assert ep.run_sync({"mode": "raise", "x": 42}, timeout=60) is None

    job = ep.run({"mode": "raise", "x": 43})
    job.output(timeout=60)
    final = status_of(ep, job.job_id)
    assert final["status"] == "FAILED", final
    assert isinstance(final["error"], str), final
    err = json.loads(final["error"])  # what clients of Runpod do with it
    assert set(err) == {"error_type", "error_message", "error_traceback", "hostname",
                        "worker_id", "runpod_version"}, err  # fmt: skip
    assert err["error_type"] == "<class 'ValueError'>", err
    assert err["error_message"] == "bad value 43 from the handler", err
    tb = err["error_traceback"]
    assert tb.startswith("Traceback (most recent call last):"), tb
    assert "raise ValueError" in tb and tb.rstrip().endswith("bad value 43 from the handler"), tb
    assert err["worker_id"] == final["workerId"] and err["hostname"], err
    assert err["runpod_version"].startswith("flash-jupyter "), err


def test_purge_queue_and_cancel(client, rp, name, tmp_path):
    gate = str(tmp_path / "gate")
    deploy_gated(name)
    ep = rp.Endpoint(name)

    busy = ep.run({"tag": "busy", "gate": gate})
    wait_status(ep, busy.job_id, {"IN_PROGRESS"})
    queued = [ep.run({"tag": f"q{i}"}) for i in range(3)]
    assert job_counts(ep)["inQueue"] == 3

    assert ep.purge_queue() == {"removed": 3, "status": "completed"}
    assert all(status_of(ep, j.job_id)["status"] == "CANCELLED" for j in queued)
    assert job_counts(ep)["inQueue"] == 0

    assert busy.cancel() == {"id": busy.job_id, "status": "CANCELLED"}
    assert status_of(ep, busy.job_id)["status"] == "CANCELLED"
    # The endpoint serves on after the cancel (its worker is replaced if need be).
    assert ep.run_sync({"tag": "after"}, timeout=60) == "after"


def test_stream_hands_out_each_chunk_once_and_ends(client, rp, name, tmp_path):
    gate = str(tmp_path / "gate")

    @Endpoint(name=name, workers=(0, 1), idle_timeout=30)
    def tokens(n, gate=None):
        for i in range(n):
            if i == 1 and gate:
                wait_gate(gate)  # the first chunk is out; the rest wait for the test
            yield {"token": i}

    tokens.deploy()
    ep = rp.Endpoint(name)
    job = ep.run({"n": 5, "gate": gate})
    got = []
    for chunk in job.stream():  # Runpod's loop: ends on a final status with no chunk
        got.append(chunk)
        assert len(got) <= 5, f"a chunk came twice: {got}"
        if len(got) == 1:
            # The first chunk came while the job was still running (it waits on the gate).
            assert status_of(ep, job.job_id)["status"] == "IN_PROGRESS"
            Path(gate).touch()
    assert got == [{"token": i} for i in range(5)]
    assert job.status() == "COMPLETED"
    assert job.output() == got  # the output is the list of chunks

    # The cursor is spent: a last call has no chunk and the final status. ?all=1 reads the
    # whole list, and leaves the cursor where it is.
    assert get(ep, f"stream/{job.job_id}") == {"status": "COMPLETED", "stream": []}
    whole = get(ep, f"stream/{job.job_id}?all=1")
    assert whole["stream"] == [{"output": c} for c in got], whole
    assert get(ep, f"stream/{job.job_id}")["stream"] == []
    with pytest.raises(requests.HTTPError) as e:
        get(ep, f"stream/{job.job_id}?all=maybe")
    assert e.value.response.status_code == 400 and "all" in e.value.response.json()["error"]

    # A job that yields nothing: stream() ends at once with nothing.
    plain = ep.run({"n": 0})
    assert list(plain.stream()) == []


# ---------------------------------------------------------------- the asyncio client


def test_asyncio_endpoint(client, rp, name, tmp_path):
    import aiohttp

    gate = str(tmp_path / "gate")

    @Endpoint(name=name, workers=(0, 1), idle_timeout=30)
    def work(n=0, gate=None, sleep=0):
        import time

        if gate:
            wait_gate(gate)
        if sleep:
            time.sleep(sleep)
        yield from ({"i": i} for i in range(n))

    work.deploy()

    async def main():
        async with aiohttp.ClientSession() as session:
            ep = rp.AsyncioEndpoint(name, session)
            job = await ep.run({"n": 2})
            assert await job.output(timeout=60) == [{"i": 0}, {"i": 1}]
            assert await job.status() == "COMPLETED"

            streamed = await ep.run({"n": 3})
            got = [c async for c in streamed.stream()]
            assert got == [{"i": 0}, {"i": 1}, {"i": 2}]

            health = await ep.health()
            assert health["workers"]["ready"] == 1, health

            busy = await ep.run({"gate": gate})
            while await busy.status() != "IN_PROGRESS":
                await asyncio.sleep(0.05)
            waiting = [await ep.run({"n": 1}) for _ in range(2)]
            assert await ep.purge_queue() == {"removed": 2, "status": "completed"}
            for j in waiting:
                assert await j.status() == "CANCELLED"
            assert await busy.cancel() == {"id": busy.job_id, "status": "CANCELLED"}

    asyncio.run(asyncio.wait_for(main(), 120))


# ---------------------------------------------------------------- webhook


def test_webhook_gets_the_final_status_and_is_retried(own_server, monkeypatch, name, hooks):
    s = own_server(FLASH_JUPYTER_WEBHOOK_RETRY_DELAY="0.2")
    use_server(s, monkeypatch)
    point_runpod_at(s, monkeypatch)
    deploy_echo(name)
    ep = runpod.Endpoint(name)

    hook = hooks(503)  # the first call fails; Runpod calls again
    job = ep.run({"input": {"x": 1}, "webhook": hook.url("/done?secret=abc")})
    assert job.output(timeout=60) == {"got": {"x": 1}}
    wait_for(lambda: len(hook.calls) == 2, what="the webhook's retry")
    final = wait_status(ep, job.job_id)
    wait_for(lambda: status_of(ep, job.job_id)["webhook"]["state"] == "delivered",
             what="the delivery to be recorded")  # fmt: skip
    view = status_of(ep, job.job_id)["webhook"]
    assert [a.get("status") for a in view["attempts"]] == [503, 200], view
    assert "secret" not in json.dumps(view)  # the URL (and what it carries) is not shown
    for call in hook.calls:
        assert call["path"] == "/done?secret=abc" and call["type"] == "application/json"
        sent = call["body"]
        assert sent["id"] == job.job_id and sent["status"] == "COMPLETED", sent
        assert sent["output"] == {"got": {"x": 1}} and "webhook" not in sent, sent
        assert {k: v for k, v in final.items() if k != "webhook"} == sent

    # A failed job's webhook carries its status payload too, error included.
    hook2 = hooks()
    failed = ep.run({"input": {"mode": "raise", "x": 2}, "webhook": hook2.url()})
    wait_for(lambda: hook2.calls, what="the failed job's webhook")
    body = hook2.calls[0]["body"]
    assert failed.status() == "FAILED" and body["status"] == "FAILED", body
    assert json.loads(body["error"])["error_message"] == "bad value 2 from the handler"

    # Nobody listening: three attempts, then "failed"; the job itself is unaffected.
    hook3 = hooks()
    dead = hook3.url()
    hook3.close()
    lost = ep.run({"input": {"x": 3}, "webhook": dead})
    assert lost.output(timeout=60) == {"got": {"x": 3}}

    def gave_up():
        v = status_of(ep, lost.job_id)["webhook"]
        return v if v["state"] == "failed" else None

    v = wait_for(gave_up, what="the webhook to give up")
    assert len(v["attempts"]) == 3 and all("error" in a for a in v["attempts"]), v


def test_webhook_never_delays_the_job(own_server, monkeypatch, name, hooks):
    s = own_server()
    use_server(s, monkeypatch)
    point_runpod_at(s, monkeypatch)
    deploy_echo(name)
    ep = runpod.Endpoint(name)
    hook = hooks(hold=True)  # the receiver holds every request until released
    job = ep.run({"input": {"x": 5}, "webhook": hook.url()})
    hook.arrived.wait(60)
    assert hook.arrived.is_set(), "the webhook was never called"
    # The receiver has not answered, and the job is over and served already.
    st = status_of(ep, job.job_id)
    assert st["status"] == "COMPLETED" and st["webhook"]["state"] == "sending", st
    assert ep.run_sync({"x": 6}, timeout=60) == {"got": {"x": 6}}
    hook.release.set()
    wait_for(lambda: status_of(ep, job.job_id)["webhook"]["state"] == "delivered",
             what="the held webhook to be delivered")  # fmt: skip


BAD_WEBHOOKS = [
    (123, "URL string"),
    ("", "absolute http"),
    ("ftp://127.0.0.1/x", "absolute http"),
    ("file:///etc/passwd", "absolute http"),
    ("127.0.0.1:9/hook", "absolute http"),
    ("http://", "no valid host"),
    ("http:///path", "no valid host"),
    ("http://exa mple.com/", "printable ASCII"),
    ("http://example.com/\n", "printable ASCII"),
    ("http://ex\\ample.com/", "backslashes"),
    ("http://bücher.example/", "printable ASCII"),
    ("http://user:pw@example.com/", "user name or password"),
    ("http://a@b@example.com/", "user name or password"),
    ("http://example.com:99999/", "not a valid URL"),
    ("http://example.com:0/", "port"),
    ("http://[::zz]/", "not a valid URL"),
    ("http://exa<mple.com/", "no valid host"),
    ("http://example.com/" + "a" * 2100, "at most 2048"),
    (["http://example.com/"], "URL string"),
]


def test_bad_webhooks_are_refused_before_anything_is_recorded(client, rp, name):
    deploy_echo(name)
    ep = rp.Endpoint(name)
    assert ep.run_sync({"x": 0}, timeout=60) == {"got": {"x": 0}}
    before = job_counts(ep)
    for url, words in BAD_WEBHOOKS:
        for call in (ep.run, ep.run_sync):
            msg = refused(lambda call=call, url=url: call({"input": {"x": 1}, "webhook": url}))
            assert words in msg and len(msg) < 400, (url, msg)
    assert job_counts(ep) == before
    # null is "no webhook", as if the field were absent.
    assert ep.run_sync({"input": {"x": 2}, "webhook": None}, timeout=60) == {"got": {"x": 2}}


def test_webhook_hosts_setting_restricts_them(own_server, monkeypatch, name, hooks):
    s = own_server(FLASH_JUPYTER_WEBHOOK_HOSTS="127.0.0.1, hooks.invalid ,not a host")
    use_server(s, monkeypatch)
    point_runpod_at(s, monkeypatch)
    deploy_echo(name)
    ep = runpod.Endpoint(name)
    hook = hooks()
    port = hook.httpd.server_address[1]
    before = job_counts(ep)
    for url in (f"http://localhost:{port}/", f"http://127.0.0.2:{port}/", "https://evil.invalid/",
                f"http://[::1]:{port}/", f"http://2130706433:{port}/"):  # fmt: skip
        msg = refused(lambda url=url: ep.run({"input": {"x": 0}, "webhook": url}))
        assert "is not allowed" in msg and "FLASH_JUPYTER_WEBHOOK_HOSTS" in msg, msg
    assert job_counts(ep) == before
    assert "ignoring 'not a host'" in s.log()
    job = ep.run({"input": {"x": 1}, "webhook": hook.url()})
    wait_for(lambda: hook.calls, what="the allowed host's webhook")
    assert hook.calls[0]["body"]["id"] == job.job_id


# ---------------------------------------------------------------- policy


def test_policy_execution_timeout_ends_the_job_timed_out(client, rp, name):
    deploy_gated(name)
    ep = rp.Endpoint(name)
    assert ep.run_sync({"tag": "warm"}, timeout=60) == "warm"
    job = ep.run({"input": {"tag": "slow", "sleep": 300}, "policy": {"executionTimeout": 5000}})
    assert job.output(timeout=90) is None
    final = status_of(ep, job.job_id)
    assert final["status"] == "TIMED_OUT", final
    assert "policy.executionTimeout of 5000 ms exceeded" in final["error"], final
    # The worker was replaced; the endpoint serves on.
    assert ep.run_sync({"tag": "next"}, timeout=60) == "next"


BAD_POLICIES = [
    ({"executionTimeout": 4999}, "from 5000 (5 s) to 604800000"),
    ({"executionTimeout": 604800001}, "executionTimeout"),
    ({"executionTimeout": -1}, "executionTimeout"),
    ({"executionTimeout": 0}, "executionTimeout"),
    ({"executionTimeout": "60000"}, "whole number of milliseconds"),
    ({"executionTimeout": True}, "whole number"),
    ({"executionTimeout": 5000.5}, "whole number"),
    ({"executionTimeout": 1e300}, "executionTimeout"),
    ({"executionTimeout": 10**40}, "(7 days), not 10000000000"),
    ({"ttl": 9999}, "policy.ttl must be a whole number of milliseconds from 10000 (10 s)"),
    ({"ttl": 7 * 24 * 3600 * 1000 + 1}, "ttl"),
    ({"ttl": [10000]}, "ttl"),
    ({"lowPriority": "yes"}, "lowPriority must be true or false"),
    ({"lowPriority": 1}, "lowPriority must be true or false"),
    ({"executiontimeout": 60000}, "did you mean 'executionTimeout'"),
    ({"priority": "low"}, "unknown policy field 'priority'"),
    ([{"ttl": 10000}], '"policy" must be a JSON object'),
    ("fast", '"policy" must be a JSON object'),
]


def test_bad_policies_are_refused_before_anything_is_recorded(client, rp, name):
    deploy_echo(name)
    ep = rp.Endpoint(name)
    assert ep.run_sync({"x": 0}, timeout=60) == {"got": {"x": 0}}
    before = job_counts(ep)
    for pol, words in BAD_POLICIES:
        for call in (ep.run, ep.run_sync):
            msg = refused(lambda call=call, pol=pol: call({"input": {"x": 1}, "policy": pol}))
            assert words in msg and len(msg) < 300, (pol, msg)
    assert job_counts(ep) == before
    # The limits themselves are accepted, and null or {} ask for nothing.
    for pol in ({"executionTimeout": 5000, "ttl": 604800000, "lowPriority": False},
                {"executionTimeout": 604800000.0, "ttl": 10000}, {}, None):  # fmt: skip
        assert ep.run_sync({"input": {"x": 3}, "policy": pol}, timeout=60) == {"got": {"x": 3}}


def test_policy_ttl_forgets_a_finished_job(client, rp, name):
    deploy_echo(name)
    ep = rp.Endpoint(name)
    kept = ep.run({"input": {"x": 1}})
    job = ep.run({"input": {"x": 2}, "policy": {"ttl": 10000}})
    assert job.output(timeout=60) == {"got": {"x": 2}}
    assert status_of(ep, job.job_id)["status"] == "COMPLETED"  # there until its ttl passes

    def gone():
        try:
            status_of(ep, job.job_id)
        except requests.HTTPError as e:
            return e.response.status_code == 404
        return False

    wait_for(gone, timeout=60, what="the job to be forgotten after its ttl")
    assert status_of(ep, kept.job_id)["output"] == {"got": {"x": 1}}  # no ttl: still there


def test_policy_ttl_ends_a_job_still_queued_timed_out(client, rp, name, tmp_path, hooks):
    gate = str(tmp_path / "gate")
    deploy_gated(name)
    ep = rp.Endpoint(name)
    hook = hooks()
    busy = ep.run({"tag": "busy", "gate": gate})
    wait_status(ep, busy.job_id, {"IN_PROGRESS"})
    stuck = ep.run({"input": {"tag": "stuck"}, "policy": {"ttl": 10000}, "webhook": hook.url()})
    wait_for(lambda: hook.calls, timeout=60, what="the expired job's webhook")
    sent = hook.calls[0]["body"]
    assert sent["id"] == stuck.job_id and sent["status"] == "TIMED_OUT", sent
    assert "policy.ttl of 10000 ms passed before a worker took it" in sent["error"], sent
    with pytest.raises(requests.HTTPError) as e:
        status_of(ep, stuck.job_id)
    assert e.value.response.status_code == 404
    assert job_counts(ep)["inQueue"] == 0
    Path(gate).touch()
    assert busy.output(timeout=60) == "busy"


def test_low_priority_jobs_queue_behind_the_others(client, rp, name, tmp_path):
    gate, log = str(tmp_path / "gate"), tmp_path / "order.log"
    deploy_gated(name, log)
    ep = rp.Endpoint(name)
    busy = ep.run({"tag": "busy", "gate": gate})
    wait_status(ep, busy.job_id, {"IN_PROGRESS"})
    low = {"lowPriority": True}
    jobs = [
        ep.run({"input": {"tag": "low1"}, "policy": low}),
        ep.run({"input": {"tag": "n1"}}),
        ep.run({"input": {"tag": "low2"}, "policy": low}),
        ep.run({"input": {"tag": "n2"}, "policy": {"lowPriority": False}}),
        ep.run({"input": {"tag": "n3"}, "policy": {"ttl": 600000}}),
    ]
    Path(gate).touch()
    for j in jobs:
        wait_status(ep, j.job_id, {"COMPLETED"})
    assert log.read_text().split() == ["busy", "n1", "n2", "n3", "low1", "low2"]


def test_webhook_and_policy_survive_a_restart(own_server, monkeypatch, name, tmp_path, hooks):
    s = own_server()
    use_server(s, monkeypatch)
    point_runpod_at(s, monkeypatch)
    gate, log = str(tmp_path / "gate"), tmp_path / "order.log"
    deploy_gated(name, log)
    ep = runpod.Endpoint(name)
    busy = ep.run({"tag": "busy", "gate": gate})
    wait_status(ep, busy.job_id, {"IN_PROGRESS"})
    hook = hooks()
    low = ep.run({"input": {"tag": "low"}, "policy": {"lowPriority": True}, "webhook": hook.url()})
    normal = ep.run({"input": {"tag": "normal"}})
    s.stop()  # a clean stop: the running job goes back to the queue
    s.start()
    Path(gate).touch()
    for j in (busy, low, normal):
        wait_status(ep, j.job_id, {"COMPLETED"})
    # Read back from the database: the low-priority job still waits behind the other one,
    # and its webhook is still called.
    assert log.read_text().split() == ["busy", "normal", "low"]
    wait_for(lambda: hook.calls, what="the webhook of a job queued before the restart")
    assert hook.calls[0]["body"]["id"] == low.job_id
    assert hook.calls[0]["body"]["status"] == "COMPLETED"
