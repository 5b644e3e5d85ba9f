"""A control plane killed with SIGKILL leaves no worker's bill unclosed: each bill is a ledger
row from the worker's start, its ``seen`` moved on while the control plane runs, closed at the
next start at the last time the worker was known alive (``closed`` "last_seen"), said so in
the ledger and in /v1/billing. And the two soak scripts (scripts/soak_kills.py,
scripts/crash_restart.py) run in CI with small numbers."""

from __future__ import annotations

import importlib.util
import math
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import use_server, wait_for

from flash_jupyter import Endpoint
from flash_jupyter import client as fj_client
from flash_jupyter.protocol import pid_alive
from flash_jupyter.server.billing import audit

ROOT = Path(__file__).resolve().parent.parent
L4_PRICE = 0.00019


def bills(data_dir: Path, where: str = "1") -> list[dict]:
    db = sqlite3.connect(f"file:{data_dir / 'flash.db'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute(f"SELECT * FROM ledger WHERE {where}")]
    finally:
        db.close()


def test_sigkilled_control_plane_bills_are_closed_at_the_next_start(own_server, monkeypatch,
                                                                     name):  # fmt: skip
    s = own_server()
    client = use_server(s, monkeypatch)

    @Endpoint(name=name, gpu="L4", workers=(1, 1), idle_timeout=5)
    def pid():
        import os

        return os.getpid()

    worker_pid = pid()
    # The bill is in flash.db while the worker runs (open), and its "seen" moves on.
    row = wait_for(
        lambda: [b for b in bills(s.data_dir, "closed IS NULL") if b["seen"] > b["started"] + 1],
        timeout=30, what="the open bill's seen to move on",
    )[0]  # fmt: skip
    fj_client.reset_client()
    s.proc.send_signal(signal.SIGKILL)
    s.proc.wait(10)
    killed = time.time()
    wait_for(lambda: not pid_alive(worker_pid), what="the worker to exit with the wire")
    # Nothing closed it: the dead control plane left it open, and it is still there.
    left = bills(s.data_dir, "closed IS NULL")
    assert [b["bill"] for b in left] == [row["bill"]]
    seen = left[0]["seen"]
    assert seen >= row["seen"]

    s.start()
    client = use_server(s, monkeypatch)
    closed = bills(s.data_dir, f"bill = '{row['bill']}'")[0]
    assert closed["closed"] == "last_seen"
    assert closed["stopped"] == seen <= killed  # what was last known, never past the crash
    assert closed["seconds"] == max(1, math.ceil(seen - closed["started"]))
    assert closed["cost"] == pytest.approx(closed["seconds"] * L4_PRICE, abs=1e-12)

    bill = client.billing()
    e = bill["endpoints"][name]
    assert e["bills"]["last_seen"] == 1 and e["bills"]["exit"] == 0
    assert "last time" in bill["closed_by"]["last_seen"]
    assert [(r["worker_id"], r["seconds"], r["closed"]) for r in bill["recovered"]] == [
        (closed["worker_id"], closed["seconds"], "last_seen")
    ]
    # All time = the recovered bill + this session's (the new worker, counted up to now).
    assert e["billed_seconds"] - e["session_seconds"] == closed["seconds"]
    # The restarted control plane starts the endpoint's minimum again: a new, open bill.
    wait_for(lambda: client.billing()["endpoints"][name]["bills"]["open"] == 1,
             what="the new worker's bill")  # fmt: skip
    assert len(bills(s.data_dir, "closed IS NULL")) == 1

    fj_client.reset_client()
    s.stop()  # a clean stop closes every bill at its process's exit
    a = audit(s.data_dir / "flash.db")
    assert a["mismatches"] == [] and a["overlaps"] == [] and a["open"] == []
    assert a["closed"] == {"last_seen": 1, "exit": 1}
    assert bills(s.data_dir, "closed IS NULL") == []


# ---------------------------------------------------------------- the soak scripts, short


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def isolate(monkeypatch) -> None:
    """The scripts point this process's client at their control plane: undone afterwards."""
    monkeypatch.setenv("FLASH_JUPYTER_URL", "unset")
    monkeypatch.setenv("FLASH_JUPYTER_TOKEN", "unset")


def test_soak_kills_short(tmp_path, monkeypatch, capsys):
    isolate(monkeypatch)
    soak = load_script("soak_kills")
    rc = soak.main(["--jobs", "40", "--every", "0.7", "--work-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    for check in ("outcome", "lost", "twice", "retried", "kills", "billing"):
        assert f"| {check} " in out


def test_crash_restart_short(tmp_path, monkeypatch, capsys):
    isolate(monkeypatch)
    crash = load_script("crash_restart")
    rc = crash.main(["--jobs", "60", "--work-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "closed last_seen at the restart" in out and "60 jobs" in out
