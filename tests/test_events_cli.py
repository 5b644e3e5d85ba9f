"""Live events over SSE (``GET /v1/events``) and the ``flash-jupyter`` command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from conftest import wait_for

from flash_jupyter import Endpoint

CLI = str(Path(sys.executable).with_name("flash-jupyter"))


# ---------------------------------------------------------------- events


class EventReader:
    """Reads ``GET /v1/events`` in a thread until ``stop(events)`` says enough."""

    def __init__(self, server, stop):
        self.events: list[dict] = []
        self.comments: list[str] = []
        self.status: int | None = None
        self.content_type = ""
        self.error: BaseException | None = None
        self._stop = stop
        self._server = server
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            timeout = httpx.Timeout(10, read=30)
            with self._server.http() as h, h.stream("GET", "/v1/events", timeout=timeout) as r:
                self.status = r.status_code
                self.content_type = r.headers.get("content-type", "")
                data: list[str] = []
                for line in r.iter_lines():
                    if line.startswith(":"):
                        self.comments.append(line)
                    elif line.startswith("data:"):
                        data.append(line[5:].strip())
                    elif line == "" and data:
                        self.events.append(json.loads("\n".join(data)))
                        data = []
                        if self._stop(self.events):
                            return
        except BaseException as e:  # reported to the test
            self.error = e

    def join(self, timeout: float) -> list[dict]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"SSE stream did not deliver in {timeout} s: " + str(
            [(e["type"], e.get("status") or e.get("state")) for e in self.events]
        )
        assert self.error is None, repr(self.error)
        return self.events


def test_events_stream_snapshot_then_job_worker_output_billing(client, server, name):
    marker = f"printed-by-{name}"

    @Endpoint(name=name, gpu="A100", workers=(0, 1), idle_timeout=1)
    def talk(n):
        print(marker, n, flush=True)
        return n * 2

    talk.deploy()

    def billed(events):
        # The bill closes as the worker stops; its Idle state change follows.
        seen = [e["type"] for e in events if e.get("endpoint") == name
                and (e["type"] == "billing" or e.get("state") == "Idle")]  # fmt: skip
        return "billing" in seen and seen[-1] == "worker"

    reader = EventReader(server, billed)
    wait_for(lambda: reader.events or reader.error, timeout=15, what="the snapshot event")
    assert reader.status == 200 and reader.content_type.startswith("text/event-stream")
    snap = reader.events[0]
    assert snap["type"] == "snapshot", snap
    assert name in [e["name"] for e in snap["endpoints"]]

    with server.http() as api:
        r = api.post(f"/v2/{name}/runsync", json={"input": {"n": 21}})
        assert r.json()["output"] == 42, r.json()
        jid = r.json()["id"]
        # The warm worker stops after idle_timeout (1 s); its bill closes with a billing event.
        events = reader.join(30)

    assert events[0]["type"] == "snapshot"
    assert all(e["type"] != "snapshot" for e in events[1:])
    seqs = [e["seq"] for e in events[1:]]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

    jobs = [e for e in events if e["type"] == "job" and e.get("id") == jid]
    statuses = [e["status"] for e in jobs]
    assert statuses[0] == "IN_QUEUE" and statuses[-1] == "COMPLETED", statuses
    assert "IN_PROGRESS" in statuses, statuses
    assert all(e["endpoint"] == name for e in jobs)
    done = jobs[-1]
    assert done["workerId"].startswith(name) and done["executionTime"] >= 0

    workers = [e for e in events if e["type"] == "worker" and e.get("endpoint") == name]
    states = [e["state"] for e in workers]
    assert "Initializing" in states and "Running" in states, states
    assert states.index("Initializing") < states.index("Running")
    assert states[-1] == "Idle", states
    assert all(e["id"].startswith(name) for e in workers)
    assert any("emulated" in e["hardware"] for e in workers)

    out = [e for e in events if e["type"] == "output" and e.get("endpoint") == name]
    text = "".join(e["text"] for e in out)
    assert f"{marker} 21" in text, out
    assert any(e["job"] == jid and e["stream"] == "stdout" for e in out)

    # Order: queued, then the output, then the completion.
    idx = {id(e): i for i, e in enumerate(events)}
    first_out = min(idx[id(e)] for e in out if marker in e["text"])
    assert idx[id(jobs[0])] < first_out < idx[id(jobs[-1])]

    bill = next(e for e in events if e["type"] == "billing" and e["endpoint"] == name)
    assert bill["seconds"] >= 1 and bill["cost"] > 0 and bill["estimate"] is True


def test_events_need_the_token(server):
    r = httpx.get(server.url + "/v1/events", timeout=5)
    assert r.status_code == 401


# ---------------------------------------------------------------- command line


def cli(server, *args: str, token: str | None = None, timeout: float = 60):
    env = {**os.environ, "FLASH_JUPYTER_URL": server.url,
           "FLASH_JUPYTER_TOKEN": server.token if token is None else token,
           "FLASH_JUPYTER_HOME": str(server.data_dir / "cli-home")}  # fmt: skip
    return subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def warm(client, server, name):
    """An emulated-A100 endpoint that has run one job (so it has a warm worker)."""

    @Endpoint(name=name, gpu="A100", workers=(0, 1), idle_timeout=5)
    def shout(word):
        print(f"shouting {word.upper()}", flush=True)
        return word.upper()

    assert shout("hello") == "HELLO"
    yield name
    with server.http() as api:
        api.delete(f"/v1/endpoints/{name}")


def test_cli_status_logs_scale_billing_stop(server, warm):
    name = warm
    assert os.access(CLI, os.X_OK), CLI

    r = cli(server, "status")
    assert r.returncode == 0, r.stderr
    assert name in r.stdout
    block = r.stdout[r.stdout.index(name) :]
    head, _, worker_line = block.splitlines()[:3]
    assert "A100" in head and "1 done" in head, head
    assert "emulated" in head, "the endpoint line should flag its cost as an emulated estimate"
    assert "Running" in worker_line and "emulated" in worker_line, block
    assert "total $" in r.stdout

    r = cli(server, "status", name)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(name) and "Running" in r.stdout and "emulated" in r.stdout

    r = cli(server, "status", name, "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data[0]["name"] == name and data[0]["workers"][0]["state"] == "Running"

    r = cli(server, "logs", name)
    assert r.returncode == 0, r.stderr
    assert "shouting HELLO" in r.stdout

    r = cli(server, "scale", name, "0,2")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["action"] == "updated"
    with server.http() as api:
        ep = api.get(f"/v1/endpoints/{name}").json()
    assert (ep["config"]["workers_min"], ep["config"]["workers_max"]) == (0, 2)
    assert len(ep["workers"]) == 2
    r = cli(server, "status", name)
    assert r.stdout.count(f"{name}-") == 2, r.stdout

    r = cli(server, "billing")
    assert r.returncode == 0, r.stderr
    bill = json.loads(r.stdout)
    assert bill["currency"] == "USD" and bill["estimate"] is True
    assert bill["endpoints"][name]["hardware"] == "A100"
    assert bill["endpoints"][name]["billed_seconds"] >= 1

    r = cli(server, "stop", name)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["name"] == name

    def stopped():
        with server.http() as api:
            ws = api.get(f"/v1/endpoints/{name}").json()["workers"]
        return all(w["state"] == "Idle" for w in ws)

    # Well before idle_timeout would have done it: stop is immediate for an idle worker.
    wait_for(stopped, timeout=4, what="stop to take the worker down")
    r = cli(server, "status", name)
    assert "Idle" in r.stdout and "Running" not in r.stdout, r.stdout


def test_cli_reports_server_errors_without_traceback(server, warm):
    name = warm
    r = cli(server, "logs", "no-such-endpoint-here")
    assert r.returncode == 1
    assert "404" in r.stderr and "no-such-endpoint-here" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr

    r = cli(server, "scale", name, "3,1")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "min" in r.stderr


def test_cli_rejects_a_malformed_scale_argument_cleanly(server, warm):
    r = cli(server, "scale", warm, "two,three")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    assert "two" in r.stderr or "MIN,MAX" in r.stderr, r.stderr


def test_cli_with_wrong_token_says_so_without_traceback(server):
    r = cli(server, "status", token="wrong-token")
    assert r.returncode != 0
    assert "401" in r.stderr or "token" in r.stderr.lower(), r.stderr
    assert "Traceback" not in r.stderr, r.stderr
