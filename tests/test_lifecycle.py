"""The worker lifecycle, end to end: scaling, cold and warm starts, reuse and update by name,
throttling, crashes, GPU labels, stop and scale. Real control planes, real worker processes.

What depends only on the scheduler's decisions and the clock (nothing stops before the idle
timeout, min workers stay, backoff) is tested on a fake clock in test_scheduler.py; here,
jobs that must stay busy wait on a gate file the test opens, never on a sleep."""

from __future__ import annotations

import os
import signal

import pytest
from conftest import use_server, wait_for

from flash_jupyter import ControlPlaneError, Endpoint
from flash_jupyter.protocol import pid_alive
from flash_jupyter.providers.local import detect_gpus


def workers(client, name: str) -> list[dict]:
    return client.endpoint(name)["workers"]


def live(client, name: str) -> list[dict]:
    """Worker slots that hold a process (or are starting one)."""
    return [w for w in workers(client, name) if w["pid"] is not None or w["state"] != "Idle"]


def all_idle(client, name: str) -> list[dict] | None:
    ws = workers(client, name)
    return ws if all(w["state"] == "Idle" and w["pid"] is None for w in ws) else None


@pytest.fixture
def cleanup(client):
    """Endpoint names to delete after the test (stops their workers on the shared server)."""
    names: list[str] = []
    yield names
    for n in names:
        try:
            client.delete(n)
        except ControlPlaneError:
            pass


# ---------------------------------------------------------------- scaling


def test_busy_endpoint_scales_to_max_then_back_to_idle(client, name, cleanup, tmp_path):
    cleanup.append(name)
    gate = tmp_path / "gate"

    @Endpoint(name=name, workers=(0, 2), idle_timeout=1)
    def nap(i, gate):
        import os
        import time

        deadline = time.monotonic() + 60  # until the test opens the gate
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        return i, os.getpid()

    jobs = [nap.submit(i, str(gate)) for i in range(4)]
    # Four jobs queued, max two workers: both start and both run (until the gate opens).
    wait_for(lambda: client.health(name)["workers"]["running"] == 2, timeout=20,
             what="two workers running jobs")  # fmt: skip
    ws = workers(client, name)
    assert len(ws) == 2
    assert {w["state"] for w in ws} == {"Running"}
    assert len({w["pid"] for w in ws}) == 2 and None not in {w["pid"] for w in ws}
    assert client.health(name)["jobs"]["inQueue"] == 2  # no third worker
    gate.touch()

    results = [j.result(timeout=30) for j in jobs]
    assert [r[0] for r in results] == [0, 1, 2, 3]
    assert len({r[1] for r in results}) == 2
    assert len({j.info()["workerId"] for j in jobs}) == 2
    pids = {r[1] for r in results}

    # After the idle timeout both go back to Idle: no process, billed.
    ws = wait_for(lambda: all_idle(client, name), timeout=15, what="workers back to Idle")
    assert all(w["reason"] == "scaled down (idle timeout)" for w in ws)
    wait_for(lambda: not any(pid_alive(p) for p in pids), timeout=10, what="processes gone")
    view = client.endpoint(name)
    assert view["health"]["workers"]["running"] == 0
    assert view["health"]["jobs"]["completed"] == 4
    assert view["billed_seconds"] >= 2  # two workers, at least a second each
    assert view["cost"] == pytest.approx(view["billed_seconds"] * view["price_per_second"])


def test_first_call_is_cold_then_warm_then_cold_again_after_idle(client, name, cleanup):
    cleanup.append(name)

    @Endpoint(name=name, workers=(0, 1), idle_timeout=1)
    def where():
        import os

        return os.getpid()

    j1 = where.submit()
    p1 = j1.result(timeout=30)
    i1 = j1.info()
    assert i1["cold"] is True
    # Whole milliseconds; an adopted spare process can start a worker in under one.
    assert isinstance(i1["coldStartTime"], int) and i1["coldStartTime"] >= 0
    assert i1["executionTime"] >= 0 and i1["delayTime"] >= i1["coldStartTime"] - 5

    j2 = where.submit()
    p2 = j2.result(timeout=30)
    i2 = j2.info()
    assert i2["cold"] is False
    assert "coldStartTime" not in i2
    assert p2 == p1 and i2["workerId"] == i1["workerId"]

    # workers=(0, n): a call after a quiet idle_timeout is a cold start on a new process.
    wait_for(lambda: all_idle(client, name), timeout=15, what="worker back to Idle")
    j3 = where.submit()
    p3 = j3.result(timeout=30)
    assert j3.info()["cold"] is True
    assert p3 != p1


def test_min_one_worker_starts_on_deploy_and_takes_the_first_call(client, name, cleanup):
    """That it stays far past idle_timeout: test_scheduler.py (on a fake clock)."""
    cleanup.append(name)

    @Endpoint(name=name, workers=(1, 2), idle_timeout=1)
    def where():
        import os

        return os.getpid()

    assert where.deploy()["action"] == "created"
    ws = wait_for(
        lambda: [w for w in workers(client, name) if w["state"] == "Running" and w["pid"]],
        timeout=20,
        what="the min worker to be Running",
    )
    assert len(ws) == 1
    pid = ws[0]["pid"]
    assert client.health(name)["jobs"]["completed"] == 0  # no job asked for it

    job = where.submit()
    assert job.result(timeout=30) == pid
    assert job.info()["cold"] is False  # it was ready before the call


# ---------------------------------------------------------------- naming


def test_same_name_reuses_updates_or_creates(client, name, cleanup, tmp_path):
    cleanup.extend([name, name + "-new"])
    gate = tmp_path / "gate"

    def who(gate=None):
        import os
        import time

        if gate:
            deadline = time.monotonic() + 60  # until the test opens the gate
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.01)
        return os.getpid(), os.environ.get("K")

    base = dict(workers=(0, 2), idle_timeout=30, env={"K": "v1"})
    first = Endpoint(name=name, **base)(who)
    assert first.deploy()["action"] == "created"
    pid1, k = first()
    assert k == "v1"

    same = Endpoint(name=name, **base)(who)
    assert same.deploy()["action"] == "reused"
    assert same() == (pid1, "v1")

    # Scaling settings apply without a restart.
    idle = Endpoint(name=name, **{**base, "idle_timeout": 20})(who)
    assert idle.deploy()["action"] == "updated"
    assert idle() == (pid1, "v1")
    more = Endpoint(name=name, **{**base, "idle_timeout": 20, "workers": (0, 3)})(who)
    assert more.deploy()["action"] == "updated"
    assert more() == (pid1, "v1")
    assert client.endpoint(name)["config"]["workers_max"] == 3

    # An environment change: the old worker, busy, becomes Outdated, finishes its job and goes.
    busy = more.submit(str(gate))
    wait_for(lambda: any(w["pid"] == pid1 and w["busy"] for w in workers(client, name)),
             what="old worker busy")  # fmt: skip
    changed = Endpoint(name=name, **{**base, "idle_timeout": 20, "workers": (0, 3),
                                     "env": {"K": "v2"}})(who)  # fmt: skip
    assert changed.deploy()["action"] == "updated"
    old = [w for w in workers(client, name) if w["pid"] == pid1]
    assert [w["state"] for w in old] == ["Outdated"]
    pid2, k2 = changed()
    assert k2 == "v2" and pid2 != pid1
    assert [w["state"] for w in workers(client, name) if w["pid"] == pid1] == ["Outdated"]
    gate.touch()
    assert busy.result(timeout=30) == (pid1, "v1")  # it finished its job first
    wait_for(lambda: not any(w["pid"] == pid1 for w in workers(client, name)),
             timeout=15, what="outdated worker replaced")  # fmt: skip
    wait_for(lambda: not pid_alive(pid1), timeout=10, what="outdated process gone")
    assert changed() == (pid2, "v2")

    other = Endpoint(name=name + "-new", **base)(who)
    assert other.deploy()["action"] == "created"


# ---------------------------------------------------------------- throttling


def test_throttled_while_host_is_full_then_runs(own_server, monkeypatch, name, tmp_path):
    s = own_server(FLASH_JUPYTER_MAX_WORKERS="1")
    client = use_server(s, monkeypatch)
    a_name, b_name = name + "-a", name + "-b"
    gate = tmp_path / "gate"

    @Endpoint(name=a_name, idle_timeout=60)
    def long_job(gate):
        import os
        import time

        deadline = time.monotonic() + 60  # until the test opens the gate
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        return os.getpid()

    @Endpoint(name=b_name, idle_timeout=60)
    def quick():
        import os

        return os.getpid()

    ja = long_job.submit(str(gate))
    wait_for(lambda: client.health(a_name)["workers"]["running"] == 1, timeout=20,
             what="A's worker running")  # fmt: skip
    jb = quick.submit()
    wb = wait_for(
        lambda: [w for w in workers(client, b_name) if w["state"] == "Throttled"],
        timeout=10,
        what="B's worker Throttled",
    )
    assert wb[0]["pid"] is None
    assert not ja.done()
    hb = client.health(b_name)
    assert hb["workers"]["throttled"] == 1 and hb["jobs"]["inQueue"] == 1
    assert client.endpoint(b_name)["billed_seconds"] == 0  # Throttled is not billed

    gate.touch()
    pid_b = jb.result(timeout=30)
    assert ja.done()  # B could only start once A's job was done (its result came first)
    pid_a = ja.result(timeout=0)
    assert pid_a != pid_b
    # A's worker, warm but idle, made room for B (the host holds one worker).
    wa = workers(client, a_name)
    assert [w["state"] for w in wa] == ["Idle"]
    assert "made room" in wa[0]["reason"]
    assert [w["state"] for w in workers(client, b_name)] == ["Running"]


# ---------------------------------------------------------------- crashes


def test_killed_worker_is_unhealthy_then_replaced(client, name, cleanup):
    cleanup.append(name)

    @Endpoint(name=name, idle_timeout=30)
    def where():
        import os

        return os.getpid()

    p1 = where()
    assert pid_alive(p1)
    os.kill(p1, signal.SIGKILL)
    w = wait_for(
        lambda: next((w for w in workers(client, name) if w["state"] == "Unhealthy"), None),
        what="worker Unhealthy",
    )
    assert "SIGKILL" in w["reason"]
    assert w["pid"] is None
    assert client.health(name)["workers"]["unhealthy"] == 1

    p2 = where()  # retried with backoff: a new worker
    assert p2 != p1
    ws = live(client, name)
    assert [(w["state"], w["pid"]) for w in ws] == [("Running", p2)]


# ---------------------------------------------------------------- GPUs


def _host_has(gpu: str) -> bool:
    return any(hw is not None and hw.name == gpu for _, _, hw in detect_gpus())


@pytest.mark.skipif(_host_has("A100"), reason="this host has a real A100")
def test_gpu_is_emulated_on_cpu_and_labelled(client, name, cleanup):
    cleanup.append(name)

    @Endpoint(name=name, gpu="A100", idle_timeout=5, env={"FJ_MARK": "from-endpoint"})
    def inside():
        import os

        return os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("FJ_MARK")

    assert inside() == ("", "from-endpoint")
    view = client.endpoint(name)
    assert view["emulated"] is True
    assert view["hardware"] == "A100"
    running = [w for w in view["workers"] if w["pid"]]
    assert len(running) == 1
    assert running[0]["hardware"] == "A100 (emulated on CPU)"
    assert running[0]["emulated"] is True
    assert client.billing()["endpoints"][name]["estimate"] is True


@pytest.mark.skipif(_host_has("A100"), reason="this host has a real A100")
def test_strict_gpu_mode_refuses_emulation(own_server, monkeypatch, name):
    s = own_server(FLASH_JUPYTER_STRICT_GPU="1")
    client = use_server(s, monkeypatch)

    @Endpoint(name=name, gpu="A100")
    def needs_gpu():
        return 1

    with pytest.raises(ControlPlaneError) as ei:
        needs_gpu.deploy()
    msg = str(ei.value)
    assert "A100" in msg and "this host has" in msg
    assert "FLASH_JUPYTER_STRICT_GPU" in msg
    with pytest.raises(ControlPlaneError, match="FLASH_JUPYTER_STRICT_GPU"):
        needs_gpu()
    assert name not in [e["name"] for e in client.endpoints()]  # nothing was recorded

    @Endpoint(name=name + "-cpu", cpu="cpu3c-1-2")
    def on_cpu():
        return 2

    assert on_cpu() == 2
    ws = [w for w in workers(client, name + "-cpu") if w["pid"]]
    assert ws[0]["hardware"] == "cpu3c-1-2" and ws[0]["emulated"] is False


# ---------------------------------------------------------------- stop and scale


def test_stop_then_scale(client, name, cleanup):
    cleanup.append(name)

    @Endpoint(name=name, workers=(0, 1), idle_timeout=60)
    def where():
        import os

        return os.getpid()

    pid = where()
    assert [w["pid"] for w in live(client, name)] == [pid]
    client.stop(name)
    ws = wait_for(lambda: all_idle(client, name), timeout=10, what="worker stopped")
    assert ws[0]["reason"] == "stopped by user"  # now, not after the 60 s idle_timeout
    wait_for(lambda: not pid_alive(pid), timeout=10, what="process gone")
    assert client.endpoint(name)["billed_seconds"] >= 1

    answer = client.scale(name, 0, 3)
    assert answer["action"] == "updated"
    view = client.endpoint(name)
    assert (view["config"]["workers_min"], view["config"]["workers_max"]) == (0, 3)
    assert len(view["workers"]) == 3
    assert all(w["state"] == "Idle" for w in view["workers"])

    client.scale(name, 1, 3)  # min 1: one worker starts without a job
    wait_for(lambda: [w for w in workers(client, name) if w["state"] == "Running" and w["pid"]],
             timeout=20, what="min worker Running")  # fmt: skip
    assert where() != pid
