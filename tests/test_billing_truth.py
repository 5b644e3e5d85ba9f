"""Billing truth: every worker's billed seconds recomputed from its recorded state history
(``worker_states``: start, hello, end) equal the ledger's, and their sums equal /v1/billing and
the endpoint view the dashboard's cards read, to the second (per second, rounded up), across a
crash of the control plane (SIGKILL) and a clean restart."""

from __future__ import annotations

import math
import signal
import sqlite3
from pathlib import Path

import pytest
from conftest import use_server, wait_for

from flash_jupyter import Endpoint, catalog
from flash_jupyter import client as fj_client
from flash_jupyter.jupyter.dashboard_cards import card_html
from flash_jupyter.server.billing import audit


def history(db_path: Path) -> list[tuple]:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT bill, worker_id, state, time FROM worker_states").fetchall()
    finally:
        db.close()


def all_stopped(client, names) -> bool:
    return all(w["pid"] is None and w["state"] in ("Idle", "Unhealthy")
               for n in names for w in client.endpoint(n)["workers"])  # fmt: skip


def check_truth(client, db: Path, names: list[str]) -> dict:
    """Every bill recomputed from its history = the ledger; the sums = /v1/billing = the
    endpoint views = what the cards show. All workers stopped (no bill open)."""
    a = audit(db)
    assert a["mismatches"] == [] and a["overlaps"] == [] and a["open"] == []
    bill = client.billing()
    for n in names:
        mine = {b: r for b, r in a["bills"].items() if r["endpoint"] == n}
        assert mine, f"no bill for {n}"
        for r in mine.values():  # Runpod's rule, from the recorded start and end
            assert r["seconds"] == max(1, math.ceil(r["stopped"] - r["started"]))
            assert r["states"][0] == "Initializing" and r["states"][-1] == "Exited"
        seconds = sum(r["seconds"] for r in mine.values())
        cost = sum(r["cost"] for r in mine.values())
        e, view = bill["endpoints"][n], client.endpoint(n)
        assert e["billed_seconds"] == view["billed_seconds"] == seconds
        assert e["cost"] == pytest.approx(cost, abs=1e-8)
        assert view["cost"] == pytest.approx(cost, abs=1e-8)
        assert sum(e["bills"][k] for k in ("exit", "last_seen")) == len(mine)
        assert e["bills"]["open"] == 0
        assert f"all time {catalog.money(view['cost'])}" in card_html(view)
    return a


def test_billing_recomputed_from_state_history_across_a_crash(own_server, monkeypatch, tmp_path,
                                                              name):  # fmt: skip
    s = own_server()
    client = use_server(s, monkeypatch)
    db = s.data_dir / "flash.db"
    cpu, gpu = name + "-c", name + "-g"
    gate = tmp_path / "gate"

    @Endpoint(name=cpu, cpu="cpu3c-1-2", workers=(0, 2), idle_timeout=1)
    def work(t, gated=False):
        import os
        import time

        deadline = time.monotonic() + 60
        while gated and not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(t)
        return t

    @Endpoint(name=gpu, gpu="L4", gpu_count=2, workers=(1, 1), idle_timeout=1)
    def one():
        return 1

    # Lifetimes that end at an exit: two CPU workers stop after their idle timeout.
    assert [j.result(timeout=60) for j in [work.submit(0.3) for _ in range(4)]] == [0.3] * 4
    assert one() == 1
    wait_for(lambda: all_stopped(client, [cpu]), timeout=30, what="cpu workers stopped")

    # Lifetimes cut by a crash: jobs held at a gate on the CPU endpoint, the GPU one warm.
    held = [work.submit(0, gated=True) for _ in range(3)]
    wait_for(lambda: client.health(cpu)["jobs"]["inProgress"] == 2, timeout=30, what="running")
    wait_for(lambda: all(b["seen"] > b["started"] for b in open_bills(db)) and len(open_bills(db))
             == 3, timeout=30, what="three open bills seen alive")  # fmt: skip
    s.proc.send_signal(signal.SIGKILL)
    s.proc.wait(10)
    s.start()
    gate.touch()
    assert [j.result(timeout=60) for j in held] == [0] * 3  # resubmitted by the client
    client.stop(gpu)
    client.scale(gpu, 0, 1)
    wait_for(lambda: all_stopped(client, [cpu, gpu]), timeout=30, what="all workers stopped")
    a = check_truth(client, db, [cpu, gpu])
    assert a["closed"]["last_seen"] == 3 and a["closed"]["exit"] >= 4
    assert {b["worker_id"] for b in client.billing()["recovered"]} == {
        r["worker_id"] for r in a["bills"].values() if r["closed"] == "last_seen"
    }
    # A gpu_count=2 L4 bill costs twice the L4's price per second.
    g = [r for r in a["bills"].values() if r["endpoint"] == gpu]
    assert all(r["cost"] == pytest.approx(r["seconds"] * 0.00019 * 2) for r in g)

    # A clean restart: the same totals, still equal to the history.
    before = {n: client.billing()["endpoints"][n]["billed_seconds"] for n in (cpu, gpu)}
    fj_client.reset_client()
    s.stop()
    s.start()
    client = use_server(s, monkeypatch)
    check_truth(client, db, [cpu, gpu])
    assert {n: client.billing()["endpoints"][n]["billed_seconds"] for n in (cpu, gpu)} == before
    assert len(history(db)) >= 3 * len(a["bills"])  # start, hello, end of each


def open_bills(db: Path) -> list[dict]:
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    c.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in c.execute("SELECT * FROM ledger WHERE closed IS NULL")]
    finally:
        c.close()


# ---------------------------------------------------------------- in-process (fake provider)


@pytest.fixture
def h(tmp_path):
    from fake_provider import Harness

    harness = Harness(tmp_path)
    yield harness
    harness.close()


def billing_writes(h) -> list[str]:
    """Counts the store's writes that touch the bills (the ledger or the state history)."""
    seen: list[str] = []
    write = h.store.write

    def counting(sql, args=(), after=None):
        if "ledger" in sql or "worker_states" in sql:
            seen.append(sql.split()[0] + (" seen" if "SET seen=?" in sql else ""))
        return write(sql, args, after)

    h.store.write = counting
    return seen


def test_billing_writes_are_per_worker_lifetime_not_per_job(h, tmp_path):
    """The hot path stays free of billing writes: 300 jobs on one warm worker over 30 s cost
    the bill's open and history rows, one "seen" per second, and the close; none per job."""
    writes = billing_writes(h)
    h.deploy("rate", cpu="cpu3c-1-2", workers=(0, 1), idle_timeout=5)
    first = h.submit("rate")
    (f,) = h.connect_all()
    f.done(first.id)
    h.settle()
    opened = list(writes)
    assert opened == ["INSERT", "INSERT", "INSERT"]  # the bill, its start, its hello
    for _ in range(300):
        job = h.submit("rate")
        h.clock.advance(0.1)
        h.wall.advance(0.1)
        f.done(job.id)
        h.tick()
    seen = [w for w in writes[len(opened) :] if w.endswith("seen")]
    assert len(writes) == len(opened) + len(seen) and 25 <= len(seen) <= 31
    h.advance(10)  # idle timeout: the worker stops, its bill closes
    assert writes[-2:] == ["UPDATE", "INSERT"]  # closed, and the end of its history
    a = audit(h.store.path)
    (b,) = a["bills"].values()
    assert b["closed"] == "exit" and b["seconds"] == math.ceil(b["stopped"] - b["started"])
    assert a["mismatches"] == a["overlaps"] == a["open"] == []


def test_a_start_that_goes_back_to_waiting_is_never_billed(h):
    """A provider's "pending" phase (no room on the cluster yet): the bill opened at the start
    is voided (Throttled), and the grant opens a new one from then."""
    h.deploy("wait", gpu="L4", workers=(0, 1), idle_timeout=5)
    job = h.submit("wait")
    (w,) = h.live("wait")
    spec = h.worker(w.id).spec
    voided = w.bill
    spec.on_phase("pending")
    h.settle()
    assert w.state == "Throttled" and w.bill is None
    h.advance(30)  # waiting for the cluster: not billed
    spec.on_phase("process")  # granted: the bill starts now
    h.settle()
    granted = h.wall()
    (f,) = h.connect_all()
    h.advance(1.5)
    f.done(job.id)
    h.advance(10)
    a = audit(h.store.path)
    assert a["mismatches"] == a["overlaps"] == a["open"] == []
    (b,) = a["bills"].values()
    assert b["started"] == granted and b["seconds"] == math.ceil(b["stopped"] - granted) < 30
    db = sqlite3.connect(f"file:{h.store.path}?mode=ro", uri=True)
    states = db.execute("SELECT state FROM worker_states WHERE bill=?", (voided,)).fetchall()
    rows = db.execute("SELECT COUNT(*) FROM ledger WHERE bill=?", (voided,)).fetchone()[0]
    db.close()
    assert [s for (s,) in states] == ["Initializing", "Throttled"] and rows == 0
