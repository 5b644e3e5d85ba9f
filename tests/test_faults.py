"""Faults lose nothing: dead workers, a restarted control plane, timeouts, cancels."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from conftest import use_server, wait_for

from flash_jupyter import Endpoint, JobCancelled, JobFailed, JobTimedOut


def test_worker_killed_mid_job_is_retried_then_completes(client, name, tmp_path):
    marker = tmp_path / "attempts"

    @Endpoint(name=name, idle_timeout=5)
    def fragile(path):
        import os
        import time

        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")
        if len(open(path).read().split()) == 1:
            time.sleep(30)  # the first attempt is killed while here
        return "ok"

    job = fragile.submit(str(marker))
    pid = int(wait_for(lambda: marker.exists() and marker.read_text().split(), what="start")[0])
    os.kill(pid, signal.SIGKILL)
    assert job.result(timeout=30) == "ok"
    pids = marker.read_text().split()
    assert len(pids) == 2 and pids[0] != pids[1]
    assert job.info()["retries"] == 1
    assert client.health(name)["jobs"]["retried"] >= 1


def test_job_that_always_kills_its_worker_fails_with_the_reason(client, name):
    @Endpoint(name=name, idle_timeout=5)
    def suicidal():
        import os
        import signal

        os.kill(os.getpid(), signal.SIGKILL)

    with pytest.raises(JobFailed) as ei:
        suicidal.submit().result(timeout=60)
    msg = str(ei.value)
    assert "SIGKILL" in msg and "giving up" in msg
    health = client.health(name)
    assert health["jobs"]["failed"] == 1 and health["jobs"]["retried"] >= 2


def test_execution_timeout_recycles_the_worker(client, name):
    @Endpoint(name=name, execution_timeout=1, idle_timeout=5)
    def slow(t):
        import os
        import time

        time.sleep(t)
        return os.getpid()

    first = slow(0)
    t = time.monotonic()
    with pytest.raises(JobTimedOut, match="execution_timeout"):
        slow(30)
    assert time.monotonic() - t < 10
    second = slow(0)
    assert second != first  # the stuck worker was replaced


def test_cancel_queued_and_running(client, name, tmp_path):
    ran = tmp_path / "ran"

    @Endpoint(name=name, workers=(0, 1), idle_timeout=5)
    def work(t, tag):
        import os
        import time

        with open(ran, "a") as f:
            f.write(tag + "\n")
        time.sleep(t)
        return os.getpid()

    pid = work(0, "warm")
    running = work.submit(30, "running")
    queued = work.submit(0, "queued")
    wait_for(lambda: running.status() == "IN_PROGRESS", what="running")
    assert queued.status() == "IN_QUEUE"
    queued.cancel()
    wait_for(lambda: queued.status() == "CANCELLED", what="queued cancel")
    t = time.monotonic()
    running.cancel()
    with pytest.raises(JobCancelled):
        running.result(timeout=10)
    assert time.monotonic() - t < 2
    # The worker survived the cancel and answers the next call.
    assert work(0, "after") == pid
    assert "queued" not in ran.read_text().split()


def _restart(server) -> None:
    server.proc.send_signal(signal.SIGKILL)  # a crash, not a clean stop
    server.proc.wait(10)
    server.start()


def test_control_plane_crash_loses_no_accepted_job(own_server, monkeypatch, tmp_path):
    server = own_server()
    client = use_server(server, monkeypatch)
    out, gate = tmp_path / "done", tmp_path / "gate"

    @Endpoint(name="restartable", workers=(0, 1), idle_timeout=5)
    def step(i):
        import os
        import time

        deadline = time.monotonic() + 60  # until the test opens the gate
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        with open(out, "a") as f:
            f.write(f"{i}\n")
        return i * 10

    jobs = [step.submit(i) for i in range(6)]
    # One job holds the worker at the gate; the others wait in the queue.
    wait_for(lambda: client.health("restartable")["jobs"]["inQueue"] == 5, what="queue")
    _restart(server)
    gate.touch()
    assert [j.result(timeout=60) for j in jobs] == [i * 10 for i in range(6)]
    assert sorted(set(map(int, out.read_text().split()))) == list(range(6))


def test_rest_jobs_survive_a_restart(own_server, monkeypatch, tmp_path):
    server = own_server()
    use_server(server, monkeypatch)
    gate = str(tmp_path / "gate")

    @Endpoint(name="rest-restart", workers=(0, 1), idle_timeout=5)
    def mul(a, b, gate):
        import os
        import time

        deadline = time.monotonic() + 60  # until the test opens the gate
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        return a * b

    mul.deploy()
    with server.http() as h:
        ids = [h.post("/v2/rest-restart/run",
                      json={"input": {"a": i, "b": 2, "gate": gate}}).json()["id"]
               for i in range(5)]  # fmt: skip
        assert all(h.get(f"/v2/rest-restart/status/{i}").json()["status"] != "COMPLETED"
                   for i in ids)  # fmt: skip
    _restart(server)
    open(gate, "w").close()
    with server.http() as h:

        def all_done():
            st = [h.get(f"/v2/rest-restart/status/{i}").json() for i in ids]
            return st if all(s["status"] == "COMPLETED" for s in st) else None

        statuses = wait_for(all_done, timeout=60, what="jobs after restart")
    assert [s["output"] for s in statuses] == [i * 2 for i in range(5)]


def test_clean_stop_closes_every_bill(own_server, monkeypatch):
    import sqlite3

    server = own_server()
    use_server(server, monkeypatch)

    @Endpoint(name="billed", gpu="L4", workers=(1, 1))
    def f():
        return 1

    assert f() == 1
    server.stop()
    db = sqlite3.connect(Path(server.data_dir) / "flash.db")
    rows = db.execute("SELECT endpoint, seconds, cost FROM ledger").fetchall()
    assert rows and rows[0][0] == "billed" and rows[0][1] >= 1
    assert abs(rows[0][2] - rows[0][1] * 0.00019) < 1e-12

    # All-time totals come back from the ledger; the session starts again from zero.
    server.start()
    client = use_server(server, monkeypatch)
    b = client.billing()["endpoints"]["billed"]
    assert b["billed_seconds"] >= rows[0][1]
    assert b["cost"] >= rows[0][2] and b["session_cost"] < b["cost"]
