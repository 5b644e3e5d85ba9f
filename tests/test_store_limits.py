"""flash.db stays bounded: the WAL is cut back under load and after a kill, the space of
pruned jobs goes back to the file system, and /v1/info reports the sizes.

These drive the real Store (and one real control plane for /v1/info). The thresholds are
shrunk through the module's constants so that a few megabytes exercise them.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flash_jupyter.server import store as store_mod
from flash_jupyter.server.store import SCHEMA, Store

INSERT = (
    "INSERT INTO jobs(id, endpoint, kind, status, body, created, finished) VALUES (?,?,?,?,?,?,?)"
)


def wal_bytes(db: Path) -> int:
    try:
        return os.path.getsize(f"{db}-wal")
    except FileNotFoundError:
        return 0


def row(i: int, size: int = 2000, finished: float | None = None) -> tuple:
    body = pickle.dumps(os.urandom(size))
    return (f"job-{i}", "ep", "json", "COMPLETED", body, time.time(), finished)


def count(db: Path) -> int:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    finally:
        con.close()


@pytest.fixture
def fast_maintenance(monkeypatch):
    """Small thresholds and a fast maintenance thread (raising=False: the names are new)."""
    monkeypatch.setattr(store_mod, "WAL_LIMIT", 512 * 1024, raising=False)
    monkeypatch.setattr(store_mod, "CHECK_EVERY", 0.01, raising=False)
    monkeypatch.setattr(store_mod, "CHECKPOINT_EVERY", 0.05)
    monkeypatch.setattr(store_mod, "VACUUM_MIN_FREE", 16, raising=False)
    # Commits held at the hard limit wait for the thread: no giving up within a test.
    monkeypatch.setattr(store_mod, "HOLD_MAX", 60.0, raising=False)
    return 512 * 1024


def test_wal_stays_bounded_while_writes_keep_coming(tmp_path, fast_maintenance):
    """Writers that never pause (each waits only for its own commit, as an HTTP /run does):
    the WAL is cut back under its limit again and again, never grows past the hard limit,
    and no write is lost to the checkpoints that take the write lock."""
    limit = fast_maintenance
    hard = getattr(store_mod, "WAL_HOLD_FACTOR", 4) * limit
    path = tmp_path / "flash.db"
    store = Store(path)
    committed = 0

    def on_commit() -> None:
        nonlocal committed
        committed += 1

    async def main() -> int:
        loop = asyncio.get_running_loop()
        store.bind_loop(loop.call_soon)
        written = cuts = biggest = 0
        over = False
        in_flight: list[asyncio.Future] = []
        deadline = time.monotonic() + 20
        while cuts < 3:
            assert time.monotonic() < deadline, f"WAL never cut back (largest {biggest} bytes)"
            done = loop.create_future()
            for _ in range(20):
                store.write(INSERT, row(written), after=on_commit)
                written += 1
            store.write("SELECT 1", after=lambda d=done: d.set_result(None))
            in_flight.append(done)
            if len(in_flight) < 4:
                await asyncio.sleep(0)  # the flush runs
            else:
                await asyncio.wait_for(in_flight.pop(0), deadline - time.monotonic())
            size = wal_bytes(path)
            biggest = max(biggest, size)
            # The hard limit, plus at most the 4 batches in flight (about 250 KB).
            assert biggest < hard + (1 << 20), f"WAL grew to {biggest} bytes"
            if size > limit:
                over = True
            elif over:
                over, cuts = False, cuts + 1
        await asyncio.gather(*in_flight)

        # Once the writes stop, the WAL goes down to nothing.
        deadline = time.monotonic() + 10
        while wal_bytes(path):
            assert time.monotonic() < deadline, wal_bytes(path)
            await asyncio.sleep(0.01)
        return written

    written = asyncio.run(main())
    assert committed == written
    assert store.sizes()["wal_resets"] >= 1
    store.close()
    assert count(path) == written


def test_commit_waits_for_a_checkpoint_without_blocking_the_loop(tmp_path):
    """While another connection holds the write lock, a flush neither waits for it on the
    loop (the old busy timeout was 5 s) nor loses its writes: they are committed, and their
    callbacks run, once the lock is free."""
    path = tmp_path / "flash.db"
    store = Store(path)
    other = sqlite3.connect(path, isolation_level=None)

    async def main() -> None:
        store.bind_loop(asyncio.get_running_loop().call_soon)
        done = asyncio.get_running_loop().create_future()
        other.execute("BEGIN IMMEDIATE")
        store.write(INSERT, row(1), after=lambda: done.set_result(True))
        deadline = time.monotonic() + 5
        while getattr(store, "deferred_commits", 0) < 2:  # tried, and tried again
            assert time.monotonic() < deadline, "the flush did not come back to the loop"
            await asyncio.sleep(0.001)
        assert not done.done()
        other.execute("ROLLBACK")
        await asyncio.wait_for(done, 5)

    asyncio.run(main())
    other.close()
    store.close()
    assert count(path) == 1


def test_wal_left_by_a_killed_process_is_truncated_at_open(tmp_path):
    path = tmp_path / "flash.db"
    script = textwrap.dedent(
        """
        import os, pickle, signal, sys, time
        from pathlib import Path
        from flash_jupyter.server import store as store_mod
        store_mod.WAL_LIMIT = 1 << 40  # this process must not cut its own WAL back
        store_mod.CHECK_EVERY = 1000.0
        s = store_mod.Store(Path(sys.argv[1]))
        s.bind_loop(lambda cb: None)  # queue everything: one transaction
        for i in range(3000):
            s.write("INSERT INTO jobs(id, endpoint, kind, status, body, created) "
                    "VALUES (?,?,?,?,?,?)", (f"j{i}", "ep", "json", "IN_QUEUE",
                    pickle.dumps(os.urandom(2000)), time.time()))
        s.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script, str(path)], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    left = wal_bytes(path)
    assert left > 4_000_000, left  # the transaction is in the WAL, not yet in the database

    store = Store(path)
    try:
        assert wal_bytes(path) == 0
        assert len(store.load_jobs()) == 3000  # nothing lost on the way
    finally:
        store.close()


def test_database_shrinks_after_pruning(tmp_path, fast_maintenance):
    path = tmp_path / "flash.db"
    store = Store(path)
    old = time.time() - 3600

    async def main() -> tuple[int, int]:
        store.bind_loop(asyncio.get_running_loop().call_soon)
        for i in range(3000):
            store.write(INSERT, row(i, finished=old if i >= 100 else None))
        await asyncio.sleep(0)
        deadline = time.monotonic() + 10
        while os.path.getsize(path) < 5_000_000:  # checkpointed into the database file
            assert time.monotonic() < deadline, os.path.getsize(path)
            await asyncio.sleep(0.01)
        full = os.path.getsize(path)
        store.delete_jobs_before(time.time() - 1800)  # what ControlPlane._prune does
        deadline = time.monotonic() + 10
        while os.path.getsize(path) > full // 4:
            assert time.monotonic() < deadline, (full, os.path.getsize(path))
            await asyncio.sleep(0.01)
        return full, os.path.getsize(path)

    full, small = asyncio.run(main())
    assert small <= full // 4
    assert len(store.load_jobs()) == 100
    assert store.sizes()["vacuumed_pages"] > 0
    store.close()


def test_existing_database_is_converted_to_incremental_vacuum(tmp_path):
    path = tmp_path / "flash.db"
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript(SCHEMA)
    con.execute(INSERT, row(1))
    assert con.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    con.close()

    store = Store(path)
    try:
        assert store.db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert [j["id"] for j in store.load_jobs()] == ["job-1"]
    finally:
        store.close()


def test_info_reports_storage_sizes(own_server):
    s = own_server()
    with s.http() as http:
        storage = http.get("/v1/info").json()["storage"]
    assert storage["db_bytes"] > 0
    for key in ("wal_bytes", "free_pages", "page_size", "wal_limit_bytes"):
        assert isinstance(storage[key], int) and storage[key] >= 0, key


def test_a_failing_write_does_not_take_its_batch_down(tmp_path):
    # One statement the database refuses, in a batch with good ones: the good ones commit
    # and every callback runs (an HTTP /run waiting on its commit is never left hanging).
    store = Store(tmp_path / "flash.db")
    called = []
    try:
        add = ("INSERT INTO ledger(worker_id, endpoint, hardware, emulated, started, stopped, "
               "seconds, cost) VALUES (?,?,?,?,?,?,?,?)")  # fmt: skip
        store.write(add, ("w-1", "ep", "cpu", 0, 1.0, 2.0, 1, 0.1), after=lambda: called.append(1))
        store.write("INSERT INTO no_such_table VALUES (1)", after=lambda: called.append(2))
        store.write(add, ("w-2", "ep", "cpu", 0, 1.0, 2.0, 1, 0.1), after=lambda: called.append(3))
        store.flush()
        assert called == [1, 2, 3]
        rows = store.db.execute("SELECT worker_id FROM ledger ORDER BY worker_id").fetchall()
        assert rows == [("w-1",), ("w-2",)]
    finally:
        store.close()
