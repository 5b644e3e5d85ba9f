"""The scheduler and the worker lifecycle, unit by unit: a real control plane and store, an
in-process provider (tests/fake_provider.py), and a clock the test moves. No processes, no
sockets, no sleeping: "nothing happens before the idle timeout" is checked by moving the
clock to just before it."""

from __future__ import annotations

import inspect

import pytest
from fake_provider import FakeProvider, Harness

from flash_jupyter.config import EndpointConfig
from flash_jupyter.providers import base
from flash_jupyter.providers.local import LocalProvider
from flash_jupyter.server import model as m
from flash_jupyter.server.lifecycle import MAX_RETRIES, START_FAILURES, backoff

NOTEBOOK = "/home/ada/work/analysis.ipynb"


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    harness.close()


def warm(h: Harness, endpoint: str, n: int = 1) -> list:
    """n warm, idle workers on ``endpoint`` (each ran one job)."""
    jobs = [h.submit(endpoint) for _ in range(n)]
    fakes = h.connect_all()
    for f in fakes:
        for jid in f.pending():
            f.done(jid)
    h.settle()
    assert all(j.status == m.COMPLETED for j in jobs)
    return fakes


# ---------------------------------------------------------------- scaling


def test_scales_up_to_max_under_load_and_no_further(h):
    ep = h.deploy("busy", workers=(0, 3), idle_timeout=10)
    assert h.provider.started == []  # min 0: nothing runs before a job
    jobs = [h.submit("busy") for _ in range(5)]
    assert sorted(h.provider.started) == [("busy-1", 1), ("busy-2", 1), ("busy-3", 1)]
    assert h.states("busy") == [m.INITIALIZING] * 3
    assert all(j.status == m.IN_QUEUE for j in jobs)

    fakes = h.connect_all()
    assert h.states("busy") == [m.RUNNING] * 3
    assert sorted(len(f.runs()) for f in fakes) == [1, 1, 1]  # least loaded first
    assert len(ep.queue) == 2
    assert h.cp.health("busy")["workers"] == {"idle": 0, "initializing": 0, "ready": 3,
                                              "running": 3, "throttled": 0,
                                              "unhealthy": 0}  # fmt: skip

    # As workers finish, the queue drains onto them; the fourth slot never exists.
    while any(f.pending() for f in fakes):
        for f in fakes:
            for jid in f.pending():
                f.done(jid)
        h.settle()
    assert all(j.status == m.COMPLETED for j in jobs)
    assert len(h.provider.started) == 3 and len(ep.workers) == 3
    assert h.cp.health("busy")["jobs"]["completed"] == 5


def test_scales_down_after_idle_timeout_not_before(h):
    h.deploy("nap", workers=(0, 2), idle_timeout=10)
    warm(h, "nap", 2)
    assert len(h.live("nap")) == 2

    h.advance(9.9)  # just before the idle timeout: both stay
    assert [w.state for w in h.live("nap")] == [m.RUNNING, m.RUNNING]
    assert not any(f.stop_asked or f.conn.frames("exit") for f in h.provider.workers.values())

    h.advance(0.2)
    assert h.live("nap") == []
    for w in h.slots("nap"):
        assert (w.state, w.pid, w.reason) == (m.IDLE, None, "scaled down (idle timeout)")
    view = h.cp.endpoint_view(h.cp.endpoints["nap"])
    assert all(v["reason"] == "scaled down (idle timeout)" for v in view["workers"])
    assert h.provider.in_use == 0  # allocations given back


def test_min_workers_stay_far_past_idle_timeout(h):
    h.deploy("kept", workers=(1, 2), idle_timeout=5)
    assert h.provider.started == [("kept-1", 1)]  # min 1: starts on deploy, no job asked
    h.connect_all()
    assert h.states("kept") == [m.IDLE, m.RUNNING]

    # Under load a second worker comes; when idle again, it goes and the min one stays.
    jobs = [h.submit("kept") for _ in range(2)]
    h.connect_all()
    for f in h.provider.workers.values():
        for jid in f.pending():
            f.done(jid)
    h.settle()
    assert all(j.status == m.COMPLETED for j in jobs)
    for _ in range(3):
        h.advance(3600)
    live = h.live("kept")
    assert len(live) == 1 and live[0].state == m.RUNNING
    assert len(h.provider.exits) == 1  # exactly one went, for idling
    assert h.provider.started[0] == ("kept-1", 1) and len(h.provider.started) == 2

    # The one kept answers the next job at once, warm.
    job = h.submit("kept")
    f = h.worker(live[0].id)
    assert f.pending() == [job.id]
    f.done(job.id)
    h.settle()
    assert job.status == m.COMPLETED and job.cold is False


def test_scaling_down_stops_workers_without_notebook_state_first(h):
    client = h.client()
    h.deploy("nb", workers=(1, 2), idle_timeout=5)
    keeper, plain = warm(h, "nb", 2)
    cell = h.submit("nb", owner=client, affinity={"worker": keeper.id, "incarnation": 1})
    keeper.done(cell.id, state={NOTEBOOK: {"x": 8}})
    h.settle()
    h.clock.advance(5)  # keeper is now the longest idle, but it keeps a notebook's names
    h.advance(100)
    assert keeper.alive and not plain.alive
    assert client.frames("state_lost") == []
    # Down to zero: the state holder goes too, and the clients hear of it.
    h.deploy("nb", workers=(0, 2), idle_timeout=5)
    h.advance(10)
    assert not keeper.alive
    (frame,) = client.frames("state_lost")
    assert frame["reason"] == (
        "scaled down (idle timeout); its remote state was lost (analysis.ipynb: x)"
    )


# ---------------------------------------------------------------- throttling


def test_throttled_while_the_provider_says_not_now_then_resumes(h):
    h.provider.capacity = 0
    h.deploy("wait", workers=(0, 1), idle_timeout=10)
    job = h.submit("wait")
    (w,) = h.slots("wait")
    assert (w.state, w.reason, w.live) == (m.THROTTLED, "waiting for host resources", False)
    assert h.provider.started == []
    health = h.cp.health("wait")
    assert health["workers"]["throttled"] == 1 and health["jobs"]["inQueue"] == 1
    h.advance(30)
    assert w.state == m.THROTTLED and h.provider.started == []  # still no room
    assert h.cp.endpoint_view(h.cp.endpoints["wait"])["billed_seconds"] == 0  # not billed

    h.provider.capacity = 1  # capacity comes back
    h.tick()
    assert w.state == m.INITIALIZING and h.provider.started == [("wait-1", 1)]
    h.connect_all()
    h.worker("wait-1").done(job.id)
    h.settle()
    assert job.status == m.COMPLETED


def test_placement_error_fails_the_queue(h):
    h.deploy("gpu", workers=(0, 1))
    job = h.submit("gpu", settle=False)
    h.provider.placement_error = "no A100 here and FLASH_JUPYTER_STRICT_GPU=1"
    h.settle()
    assert job.status == m.FAILED and "STRICT_GPU" in job.error["message"]


# ---------------------------------------------------------------- crashes


def test_crash_makes_the_slot_unhealthy_with_backoff_then_it_restarts(h):
    h.deploy("frail", workers=(0, 1), idle_timeout=10)
    job = h.submit("frail")
    (f1,) = h.connect_all()
    assert f1.pending() == [job.id]

    f1.crash("killed by SIGKILL")
    h.settle()
    (w,) = h.slots("frail")
    assert w.state == m.UNHEALTHY and w.pid is None
    assert "killed by SIGKILL" in w.reason
    assert w.retry_at == h.clock() + backoff(1) == h.clock() + 0.5
    assert job.status == m.IN_QUEUE and job.retries == 1  # back in the queue, counted
    assert h.cp.health("frail")["workers"]["unhealthy"] == 1

    h.advance(0.4)  # within the backoff: no new process
    assert h.provider.started == [("frail-1", 1)]
    h.advance(0.2)  # past it: restarted, and the job runs there
    assert h.provider.started[-1] == ("frail-1", 2) and w.state == m.INITIALIZING
    (f2,) = h.connect_all()
    assert f2.pending() == [job.id]
    f2.done(job.id)
    h.settle()
    assert job.status == m.COMPLETED and job.retries == 1
    assert w.crashes == 0  # a job went well: the backoff starts over


def test_backoff_doubles_and_a_worker_that_never_comes_up_fails_the_queue(h):
    h.deploy("broken", workers=(0, 1))
    job = h.submit("broken")
    (w,) = h.slots("broken")
    for n in range(1, START_FAILURES):
        h.worker("broken-1").crash("exited with code 1 (ImportError: no module named x)")
        h.settle()
        assert w.state == m.UNHEALTHY and w.retry_at == h.clock() + backoff(n)
        assert job.status == m.IN_QUEUE
        h.advance(backoff(n) - 0.01)
        assert h.provider.started[-1] == ("broken-1", n)  # not yet
        h.advance(0.02)
        assert h.provider.started[-1] == ("broken-1", n + 1)
    assert backoff(2) == 2 * backoff(1) and backoff(20) == 60
    h.worker("broken-1").crash("exited with code 1 (ImportError: no module named x)")
    h.settle()
    assert job.status == m.FAILED
    assert job.error["type"] == "WorkerStartError" and "ImportError" in job.error["message"]


def test_a_job_whose_worker_dies_is_retried_then_fails_with_the_reason(h):
    client = h.client()
    h.deploy("deadly", workers=(0, 1), idle_timeout=10)
    job = h.submit("deadly", owner=client)
    for attempt in range(MAX_RETRIES + 1):
        h.advance(60)  # past any backoff
        (f,) = h.connect_all()
        assert f.pending() == [job.id], f"attempt {attempt}"
        f.crash("killed by SIGKILL")
        h.settle()
        # Never lost: it is in the queue, or over.
        ep = h.cp.endpoints["deadly"]
        assert (job.status == m.IN_QUEUE and job.id in ep.queue) or job.status == m.FAILED
    assert job.status == m.FAILED and job.retries == MAX_RETRIES + 1
    assert job.error["type"] == "WorkerLost"
    assert "killed by SIGKILL" in job.error["message"] and "giving up" in job.error["message"]
    (done,) = client.frames("done")
    assert done["id"] == job.id and done["status"] == m.FAILED
    assert h.cp.health("deadly")["jobs"]["retried"] == MAX_RETRIES + 1
    # Never silently: each run again is said in the job's own output (a cell shows it).
    said = [f["text"] for f in client.frames("out") if f["id"] == job.id]
    assert len(said) == MAX_RETRIES, said
    assert all("killed by SIGKILL" in t and "running it again" in t for t in said), said
    assert f"retry 1 of {MAX_RETRIES}" in said[0], said


def test_jobs_only_waiting_on_a_dead_worker_go_back_without_a_retry(h):
    ep = h.deploy("tiny", workers=(0, 1), idle_timeout=10)
    ep.exec_ewma_ms = 0.5  # tiny jobs: several wait on the worker (prefetch)
    jobs = [h.submit("tiny") for _ in range(3)]
    (f,) = h.connect_all()
    assert f.pending() == [j.id for j in jobs]
    f.crash()
    h.settle()
    assert [j.retries for j in jobs] == [1, 0, 0]  # only the one running counts
    assert list(ep.queue) == [j.id for j in jobs]  # front of the queue, in order


def test_a_bad_frame_stops_the_worker_and_its_job_is_retried(h):
    h.deploy("liar", workers=(0, 1), idle_timeout=10)
    job = h.submit("liar")
    (f,) = h.connect_all()
    f.conn.on_frame({"op": "done", "id": job.id, "ok": True, "c": "cloudpickle",
                     "refs": [("shm", "/etc/passwd", 10)]}, [])  # fmt: skip
    h.settle()
    (w,) = h.slots("liar")
    assert w.state == m.UNHEALTHY and "bad 'done' frame" in w.reason
    assert job.status == m.IN_QUEUE and job.retries == 1  # not lost, not completed


def test_execution_timeout_recycles_the_worker(h):
    h.deploy("slow", workers=(0, 1), idle_timeout=10, execution_timeout=5)
    job = h.submit("slow")
    (f,) = h.connect_all()
    h.advance(4.9)
    assert job.status == m.IN_PROGRESS and f.alive
    h.advance(0.2)
    assert job.status == m.TIMED_OUT and not f.alive and f.exit_reason == "killed by SIGKILL"
    assert h.cp.health("slow")["jobs"]["failed"] == 1


# ---------------------------------------------------------------- updates


def test_outdated_workers_finish_their_job_then_are_replaced(h):
    h.deploy("env", workers=(0, 2), idle_timeout=30, env={"K": "v1"})
    old_job = h.submit("env")
    (old,) = h.connect_all()
    old_hash = h.cp.endpoints["env"].config.env_hash

    h.deploy("env", workers=(0, 2), idle_timeout=30, env={"K": "v2"})
    (w_old,) = h.live("env")
    assert w_old.state == m.OUTDATED and old.alive and not old.stop_asked  # busy: it stays
    new_job = h.submit("env")
    (new,) = h.connect_all()  # a new worker, for the new settings
    assert new.pending() == [new_job.id] and old.pending() == [old_job.id]
    assert new.spec.config.env == {"K": "v2"} and new.spec.config.env_hash != old_hash

    old.done(old_job.id)
    h.settle()
    assert old_job.status == m.COMPLETED  # it finished its job first
    assert not old.alive and w_old.state == m.IDLE and w_old.reason == "outdated"
    new.done(new_job.id)
    h.settle()
    assert new_job.status == m.COMPLETED
    assert [w.state for w in h.live("env")] == [m.RUNNING]


# ---------------------------------------------------------------- making room


def test_a_throttled_start_stops_the_longest_idle_worker_of_another_endpoint(h):
    h.provider.capacity = 3
    h.deploy("a", workers=(0, 2), idle_timeout=600)
    a1, a2 = warm(h, "a", 2)
    h.deploy("kept", workers=(1, 1), idle_timeout=600)  # its only worker is its min
    h.connect_all()
    h.clock.advance(5)  # now a1 and a2 have idled for longer than kept's worker
    h.clock.advance(5)
    recent = h.submit("a", affinity={"worker": a2.id, "incarnation": 1})
    a2.done(recent.id)  # a2 was active 5 s after a1
    h.settle()
    idle_longest, ran = a1, a2

    h.deploy("b", workers=(0, 1))
    job = h.submit("b")
    assert not idle_longest.alive and ran.alive  # stopped at once, the other stays
    assert h.worker("kept-1").alive  # never below an endpoint's min
    stopped = h.cp.endpoints["a"].workers[idle_longest.id]
    assert stopped.reason == "made room for b" and stopped.state == m.IDLE
    assert h.provider.started[-1] == ("b-1", 1)  # the room went to b
    h.connect_all()
    h.worker("b-1").done(job.id)
    h.settle()
    assert job.status == m.COMPLETED


def test_making_room_spares_a_worker_that_holds_a_notebooks_state(h):
    h.provider.capacity = 2
    h.deploy("nb", workers=(0, 1), idle_timeout=600)
    h.deploy("other", workers=(0, 1), idle_timeout=600)
    (nb,) = warm(h, "nb")
    cell = h.submit("nb")
    nb.done(cell.id, state={NOTEBOOK: {"model": 1 << 20}})
    h.clock.advance(10)
    warm(h, "other")  # idle for less long, but it keeps nothing
    client = h.client()

    h.deploy("burst", workers=(0, 1))
    h.submit("burst", owner=client)
    assert nb.alive and not h.worker("other-1").alive
    assert h.cp.endpoints["other"].workers["other-1"].reason == "made room for burst"
    assert client.frames("state_lost") == [] and client.frames("out") == []


def test_making_room_from_a_state_holder_tells_its_owners_at_once(h):
    h.provider.capacity = 1
    owner, burster = h.client(), h.client()
    h.deploy("nb", workers=(0, 1), idle_timeout=600)
    (nb,) = warm(h, "nb")
    cell = h.submit("nb", owner=owner)
    nb.done(cell.id, state={NOTEBOOK: {"model": 1 << 20, "df": 800}})
    h.settle()
    w = h.cp.endpoints["nb"].workers["nb-1"]
    view = h.cp.worker_view(w, h.cp.endpoints["nb"])
    assert view["remote_state"] == {
        NOTEBOOK: {"notebook": "analysis.ipynb", "names": ["df", "model"], "bytes": 1049376}
    }

    h.deploy("burst", workers=(0, 1))
    job = h.submit("burst", owner=burster)
    assert not nb.alive
    # (a) a line of output on the job that wanted the room
    (out,) = burster.frames("out")
    assert out["id"] == job.id and out["stream"] == "stderr"
    assert out["text"] == (
        "flash: stopped worker nb-1 of endpoint nb to make room for burst; "
        "it held remote state of notebook analysis.ipynb: df, model\n"
    )
    assert any(e["text"] == out["text"] for e in h.cp.endpoints["burst"].logs)
    # (c) every client hears which worker's state is gone
    expected = {"op": "state_lost", "worker": "nb-1", "incarnation": 1, "endpoint": "nb",
                "sessions": [NOTEBOOK], "names": {NOTEBOOK: ["df", "model"]},
                "reason": "made room for burst; its remote state was lost "
                          "(analysis.ipynb: df, model)"}  # fmt: skip
    assert owner.frames("state_lost") == [expected]
    assert burster.frames("state_lost") == [expected]
    # (b) the worker's view says so
    view = h.cp.worker_view(w, h.cp.endpoints["nb"])
    assert view["state"] == m.IDLE and view["reason"] == expected["reason"]
    assert view["remote_state"] == {}
    lost_view = {NOTEBOOK: {"notebook": "analysis.ipynb", "names": ["df", "model"]}}
    assert view["lost_state"] == lost_view
    # A cell bound to that state fails at once, naming why.
    lost = h.submit("nb", owner=owner, affinity={"worker": "nb-1", "incarnation": 1,
                                                 "strict": True, "names": ["model"]})  # fmt: skip
    assert lost.status == m.FAILED and lost.error["type"] == "RemoteStateLost"
    assert "made room for burst" in lost.error["message"]


def test_a_crash_of_a_state_holder_tells_the_clients(h):
    client = h.client()
    h.deploy("nb", workers=(0, 1), idle_timeout=600)
    (nb,) = warm(h, "nb")
    cell = h.submit("nb", owner=client)
    nb.done(cell.id, state={NOTEBOOK: {"x": 8}})
    nb.crash("killed by SIGKILL")
    h.settle()
    (frame,) = client.frames("state_lost")
    assert frame["worker"] == "nb-1" and frame["sessions"] == [NOTEBOOK]
    assert "killed by SIGKILL" in frame["reason"]
    w = h.cp.endpoints["nb"].workers["nb-1"]
    assert w.state == m.UNHEALTHY and "remote state was lost (analysis.ipynb: x)" in w.reason


# ---------------------------------------------------------------- affinity


def test_a_job_with_affinity_goes_to_its_worker_and_waits_for_it(h):
    h.deploy("aff", workers=(0, 2), idle_timeout=600)
    other, target = warm(h, "aff", 2)  # both idle: a job without affinity goes to "other"
    busy = h.submit("aff", affinity={"worker": target.id, "incarnation": 1})
    assert target.pending() == [busy.id]
    # The other worker is free, but a cell bound to the busy one waits for it.
    bound = h.submit("aff", affinity={"worker": target.id, "incarnation": 1, "strict": True})
    assert bound.status == m.IN_QUEUE and other.pending() == []
    target.done(busy.id)
    h.settle()
    assert target.pending() == [bound.id]


def test_affinity_to_a_gone_worker(h):
    h.deploy("aff", workers=(0, 2), idle_timeout=600)
    (f,) = warm(h, "aff")
    f.crash()
    h.settle()
    h.advance(60)
    strict = h.submit("aff", affinity={"worker": f.id, "incarnation": 1, "strict": True,
                                       "names": ["model", "df"]})  # fmt: skip
    assert strict.status == m.FAILED and strict.error["type"] == "RemoteStateLost"
    assert strict.error["names"] == ["model", "df"]
    assert "killed by SIGKILL" in strict.error["message"]
    # Not strict (the cell reads no remote name): any worker runs it.
    loose = h.submit("aff", affinity={"worker": f.id, "incarnation": 1})
    h.connect_all()
    assert loose.status == m.IN_PROGRESS and loose.body["affinity"] is None


# ---------------------------------------------------------------- views and billing


def test_cancelled_jobs_are_not_failures(h):
    h.deploy("c", workers=(0, 1), idle_timeout=600)
    (f,) = warm(h, "c")
    running = h.submit("c")
    queued = h.submit("c")  # waits behind it (one job at a time on the worker)
    h.cp.cancel(queued.id)
    h.cp.cancel(running.id)
    h.settle()
    assert f.conn.frames("cancel") == [{"op": "cancel", "id": running.id}]
    assert f.pending() == [running.id]  # the queued one never reached the worker
    f.fail(running.id, cancelled=True)  # the worker stopped it
    failing = h.submit("c")
    f.fail(failing.id)
    h.settle()
    assert (running.status, queued.status, failing.status) == (m.CANCELLED, m.CANCELLED, m.FAILED)
    jobs = h.cp.endpoint_view(h.cp.endpoints["c"])["health"]["jobs"]  # /v1
    assert (jobs["completed"], jobs["failed"], jobs["cancelled"]) == (1, 1, 2)
    assert h.cp.health("c")["jobs"]["failed"] == 1  # /v2 (Runpod's shape) agrees


def test_a_worker_that_ignores_a_cancel_is_replaced(h):
    h.deploy("c", workers=(0, 1), idle_timeout=600)
    job = h.submit("c")
    (f,) = h.connect_all()
    h.cp.cancel(job.id)
    assert job.status == m.CANCELLED
    h.advance(1.9)  # within the grace: the worker may still stop it
    assert f.alive
    h.advance(0.2)
    assert not f.alive and f.exit_reason == "killed by SIGKILL"
    (w,) = h.slots("c")
    assert w.reason == f"did not stop cancelled job {job.id}" and w.state == m.IDLE


def test_worker_views_label_hardware_and_name_notebooks(h):
    h.deploy("gpu", gpu="A100", workers=(0, 2), idle_timeout=600)
    ep = h.cp.endpoints["gpu"]
    idle = h.cp.endpoint_view(ep)["workers"]
    assert [v["hardware_label"] for v in idle] == ["A100 (emulated on CPU)"] * 2
    assert all(v["emulated"] for v in idle)
    warm(h, "gpu")
    live = [v for v in h.cp.endpoint_view(ep)["workers"] if v["pid"]]
    assert [(v["hardware_label"], v["emulated"]) for v in live] == [
        ("A100 (emulated on CPU)", True)
    ]
    view = h.cp.endpoint_view(h.deploy("cpu", workers=(0, 1)))
    assert view["workers"][0]["hardware_label"] == view["hardware"]
    assert view["workers"][0]["emulated"] is False


def test_billing_on_the_fake_clock(h):
    h.deploy("bill", cpu="cpu3c-1-2", workers=(0, 1), idle_timeout=10)
    ep = h.cp.endpoints["bill"]
    job = h.submit("bill")
    h.wall.advance(0.25)  # the cold start
    (f,) = h.connect_all()
    h.advance(2.5)  # the job runs for 2.5 s
    f.done(job.id)
    h.settle()
    (w,) = h.slots("bill")
    price = w.price
    assert price == ep.config.price_per_second > 0
    assert job.cold and job.cold_start_ms == pytest.approx(250)
    assert job.cost == pytest.approx((2.5 + 0.25) * price)
    assert h.cp.worker_view(w, ep)["billed_seconds"] == 3  # 2.75 s so far, rounded up
    h.advance(10)  # idle timeout: the worker stops, the bill closes
    assert not w.live
    assert (ep.billed_seconds, ep.session_seconds) == (13, 13)  # ceil(12.75)
    assert ep.billed_cost == pytest.approx(13 * price)
    bill = h.cp.billing()
    assert bill["endpoints"]["bill"]["billed_seconds"] == 13
    assert h.store.ledger_total("bill", ep.created)["seconds"] == 13


# ---------------------------------------------------------------- warm, phases, progress


def test_warm_starts_workers_without_a_job_and_they_go_after_idle_timeout(h):
    ep = h.deploy("pre", workers=(0, 2), idle_timeout=10)
    view = h.cp.warm("pre", 5)  # capped at max
    h.settle()
    assert view["started"] == 2 and h.states("pre") == [m.INITIALIZING] * 2
    assert [w["phase"] for w in view["workers"]] == ["process", "process"]
    h.connect_all()
    assert h.states("pre") == [m.RUNNING] * 2 and ep.config.workers_min == 0
    assert all(f.runs() == [] for f in h.provider.workers.values())  # no job ran
    views = h.cp.endpoint_view(ep)["workers"]
    assert [(w["phase"], w["scale_down_in_s"], w["idle_timeout"]) for w in views] == [
        (None, 10.0, 10.0)
    ] * 2
    assert h.cp.warm("pre", 2)["started"] == 0  # already there
    h.advance(9.9)
    assert len(h.live("pre")) == 2
    views = h.cp.endpoint_view(ep)["workers"]
    assert [w["scale_down_in_s"] for w in views] == [pytest.approx(0.1)] * 2
    h.advance(0.2)
    assert h.live("pre") == []


def test_warm_leaves_min_workers_alone_and_counts_starts(h):
    ep = h.deploy("mins", workers=(1, 3), idle_timeout=10)
    h.connect_all()
    h.cp.warm("mins", 2)
    h.settle()
    h.connect_all()
    h.advance(11)
    (kept,) = h.live("mins")  # the extra one went; min stays, with no countdown
    assert h.cp.worker_view(kept, ep)["scale_down_in_s"] is None
    # A job on the warm worker counts warm; one that waits for a start counts cold.
    warm_job = h.submit("mins")
    h.worker(kept.id).done(warm_job.id)
    h.deploy("mins", workers=(0, 1), idle_timeout=10)
    h.advance(11)
    cold_job = h.submit("mins")
    h.wall.advance(0.5)
    (f,) = h.connect_all()
    f.done(cold_job.id)
    h.settle()
    assert (warm_job.cold, cold_job.cold) == (False, True)
    starts = h.cp.endpoint_view(ep)["starts"]
    assert starts == {"cold": 1, "warm": 1, "last_cold_ms": 500.0, "mean_cold_ms": 500.0}
    assert h.cp.endpoint_view(ep)["queue"] == 0


def test_progress_frames_and_cold_start_phases(h):
    client = h.client()
    h.deploy("deps", cpu="cpu3c-1-2", workers=(0, 1), idle_timeout=10, dependencies=["six"])
    job = h.cp.submit("deps", "py", {"codec": "cloudpickle", "blobs": [b"a"], "fn_codec":
                      "cloudpickle", "fn_blobs": [b"f"]}, owner=client, job_id="p1",
                      progress=True)  # fmt: skip
    client.jobs.add(job.id)
    h.settle()
    fake = h.worker("deps-1")
    h.wall.advance(2.0)  # building the environment
    fake.spec.phase("process")
    h.settle()
    h.wall.advance(0.5)  # the interpreter starting
    fake.connect()
    h.settle()
    (w,) = h.live("deps")
    assert w.phase == "code"
    h.wall.advance(0.25)  # loading the job's code
    fake.conn.on_frame({"op": "started", "id": job.id}, [])
    h.settle()
    assert w.phase is None
    h.advance(1.0)
    fake.done(job.id)
    h.settle()
    seq = [(f["status"], f["phase"], f["worker"]) for f in client.frames("progress")]
    assert seq == [
        ("IN_QUEUE", None, None),
        ("COLD_START", "environment", "deps-1"),
        ("COLD_START", "process", "deps-1"),
        ("COLD_START", "code", "deps-1"),
        ("IN_PROGRESS", None, "deps-1"),
    ]
    assert client.frames("progress")[-1]["hardware"] == "cpu3c-1-2"
    (done,) = client.frames("done")
    assert done["coldStartPhases"] == {"environment": 2000, "process": 500, "code": 250}
    assert done["coldStartTime"] == 2500 and done["cold"] is True
    price = w.price
    assert done["pricePerSecond"] == price and done["hardwareLabel"] == "cpu3c-1-2"
    assert done["costColdStart"] == pytest.approx(2.5 * price)
    assert done["costRun"] == pytest.approx(1.25 * price)  # code loading is part of the run
    assert done["cost"] == pytest.approx(done["costRun"] + done["costColdStart"])

    # A warm job without the flag: no progress frame at all, costColdStart 0.
    quiet = h.submit("deps", owner=client)
    fake.done(quiet.id)
    h.settle()
    assert [f["id"] for f in client.frames("progress")] == ["p1"] * 5
    last = client.frames("done")[-1]
    assert last["costColdStart"] == 0 and "coldStartPhases" not in last
    assert last["hardwareLabel"] == "cpu3c-1-2"


def test_emulated_hardware_label_on_the_receipt(h):
    h.deploy("emu", gpu="A100", workers=(0, 1))
    job = h.submit("emu")
    (f,) = h.connect_all()
    f.done(job.id)
    h.settle()
    assert h.cp.status_payload(job)["hardwareLabel"] == "A100, emulated on CPU"


def test_the_ticker_publishes_nothing_while_nothing_changes(h):
    h.deploy("still", workers=(1, 3), idle_timeout=30)
    h.deploy("other", workers=(0, 1), idle_timeout=30)
    warm(h, "still", 2)
    h.cp.warm("other", 1)
    h.settle()
    h.connect_all()
    h.cp.budget.set(1000.0)
    q = h.cp.events.subscribe()
    for _ in range(100):  # 10 s of ticks, workers billed meanwhile, under every timeout
        h.advance(0.1)
    assert q.empty(), q.get_nowait()
    h.advance(30)  # something changes: the idle ones go, and that is published
    kinds = set()
    while not q.empty():
        kinds.add(q.get_nowait()["type"])
    assert {"worker", "billing"} <= kinds and "budget" not in kinds


# ---------------------------------------------------------------- the budget guard


def test_budget_reached_refuses_stops_idle_workers_and_lets_running_jobs_finish(h):
    from flash_jupyter.errors import BudgetExceeded

    client = h.client()
    h.deploy("a", workers=(1, 2), idle_timeout=100)
    h.deploy("b", workers=(0, 1), idle_timeout=100)
    h.connect_all()
    running = h.submit("a", owner=client)
    client.jobs.add(running.id)
    h.cp.warm("b", 1)
    h.settle()
    h.connect_all()
    queued = h.submit("a")  # starts a second worker of a; waits for it
    assert queued.status == m.IN_QUEUE and len(h.live("a")) == 2
    q = h.cp.events.subscribe()

    view = h.cp.budget.set(0.00001)  # a worker's first second costs more than this
    h.settle()
    assert view["state"] == "reached" and view["limit"] == 0.00001
    assert view["spent"] > 0.00001
    budget_events = []
    while not q.empty():
        e = q.get_nowait()
        if e["type"] == "budget":
            budget_events.append(e)
    assert [e["state"] for e in budget_events] == ["reached"]
    with pytest.raises(BudgetExceeded, match=r"budget of \$0\.00001 for this session reached"):
        h.submit("a")
    # Queued work fails the same way; idle (and starting) workers stop, min included;
    # the running job keeps its worker.
    assert queued.status == m.FAILED and queued.error["type"] == "BudgetExceeded"
    assert h.live("b") == []
    (busy,) = h.live("a")
    assert running.id in busy.jobs
    h.worker(busy.id).done(running.id)
    h.settle()
    assert running.status == m.COMPLETED
    assert h.live("a") == []  # it went as soon as it was idle
    assert all(w.reason == "stopped: the budget was reached" for w in h.slots("a"))

    # Over the wire: a done frame FAILED with BudgetExceeded, nothing recorded.
    before = set(h.cp.jobs)
    client.on_frame({"op": "submit", "id": "wired", "ep": "a", "refs": []}, [])
    (refused,) = [f for f in client.frames("done") if f["id"] == "wired"]
    assert refused["status"] == "FAILED" and refused["error"]["type"] == "BudgetExceeded"
    assert "flash-jupyter budget" in refused["error"]["message"]
    assert set(h.cp.jobs) == before

    # Cleared: min workers come back and jobs run again.
    assert h.cp.budget.set(None)["state"] == "ok"
    h.settle()
    assert len(h.live("a")) == 1
    assert h.store.load_setting("budget") == {"limit": None, "endpoints": {}}


def test_an_endpoint_budget_holds_that_endpoint_only(h):
    from flash_jupyter.errors import BudgetExceeded

    h.deploy("pricey", workers=(0, 1), idle_timeout=100)
    h.deploy("cheap", workers=(0, 1), idle_timeout=100)
    for name in ("pricey", "cheap"):
        h.cp.warm(name, 1)
    h.settle()
    h.connect_all()
    view = h.cp.budget.set(0.00001, endpoint="pricey")
    h.settle()
    assert view["state"] == "ok" and view["endpoints"]["pricey"]["state"] == "reached"
    assert view["endpoints"]["cheap"] == {"limit": None, "spent": view["endpoints"]["cheap"][
        "spent"], "state": "ok"}  # fmt: skip
    with pytest.raises(BudgetExceeded, match="for endpoint 'pricey' reached") as e:
        h.submit("pricey")
    assert "--endpoint pricey" in str(e.value)
    assert h.live("pricey") == [] and len(h.live("cheap")) == 1
    h.submit("cheap")  # not held
    # Near: at 80% of the limit.
    spent = h.cp.budget.view()["endpoints"]["cheap"]["spent"]
    assert h.cp.budget.set(spent / 0.9, endpoint="cheap")["endpoints"]["cheap"]["state"] == "near"
    h.cp.delete_endpoint("pricey")
    assert "pricey" not in h.cp.budget.ep_limits


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "five", True, [1], {}])
def test_budget_limits_are_validated(h, bad):
    with pytest.raises(ValueError, match="budget limit"):
        h.cp.budget.set(bad)
    assert h.cp.budget.limit is None and h.store.load_setting("budget") is None


# ---------------------------------------------------------------- the provider seam


def test_providers_implement_the_seam():
    def methods(cls):
        return [n for n, v in vars(cls).items() if inspect.isfunction(v) and n[0] != "_"]

    required = methods(base.Provider)
    assert sorted(required) == ["allocate", "describe", "kill", "pid", "release", "start", "stop"]
    optional = methods(base.OptionalProvider)
    assert sorted(optional) == sorted(base.OPTIONAL_METHODS)
    for name in base.OPTIONAL_METHODS:
        assert inspect.getdoc(getattr(base.OptionalProvider, name)), name
    for cls, names in ((FakeProvider, required), (LocalProvider, required + optional)):
        for name in names:
            impl = getattr(cls, name, None)
            assert callable(impl), f"{cls.__name__} lacks {name}"
            want = inspect.signature(getattr(base.Provider, name, None)
                                     or getattr(base.OptionalProvider, name))  # fmt: skip
            assert list(inspect.signature(impl).parameters) == list(want.parameters), name


def test_the_ray_provider_implements_the_seam():
    ray_provider = pytest.importorskip("flash_jupyter.providers.ray_provider")
    cls = ray_provider.RayProvider
    for name in ("allocate", "describe", "kill", "pid", "release", "start", "stop",
                 "prepare", "close", "would_emulate", "unmet"):  # fmt: skip
        want = getattr(base.Provider, name, None) or getattr(base.OptionalProvider, name)
        got = list(inspect.signature(getattr(cls, name)).parameters)
        assert got == list(inspect.signature(want).parameters), name


def test_low_priority_jobs_run_on_workers_that_are_up_and_never_scale_up(h):
    """Runpod's lowPriority: such a job waits for a worker started for ``min`` or for other
    jobs; it makes no worker start by itself."""
    h.cp.put_function("fnhash", "cloudpickle", [b"fn"])
    h.cp.deploy(EndpointConfig.build("lp", workers=(0, 2), idle_timeout=10), handler="fnhash")
    h.settle()

    def json_job(low: bool) -> m.Job:
        body = {"input": {}, "policy": {"lowPriority": True}} if low else {"input": {}}
        job = h.cp.submit("lp", "json", body, job_id=f"lp-{len(h.cp.jobs)}")
        h.settle()
        return job

    lows = [json_job(True), json_job(True)]
    h.advance(1.0)
    assert h.provider.started == [] and all(j.status == m.IN_QUEUE for j in lows)
    normal = json_job(False)  # one normal job: one worker, no more
    assert h.provider.started == [("lp-1", 1)]
    [w] = h.connect_all()
    order = []
    while w.pending():
        for jid in w.pending():
            order.append(jid)
            w.done(jid)
        h.settle()
    assert order == [normal.id] + [j.id for j in lows]  # the normal job first, then the others
    assert h.provider.started == [("lp-1", 1)]  # the low ones ran there, nothing else started
