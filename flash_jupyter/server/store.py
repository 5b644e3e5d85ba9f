"""SQLite persistence of endpoints, jobs, workers, functions and the billing ledger.

Writes are queued and committed together once per event-loop turn (group commit), so a
burst of 2,000 submissions costs a handful of transactions. An HTTP /run is answered only
after the transaction holding its job has committed, so a control plane that stops after
answering still has the job when it comes back. Wire clients do not wait for the commit:
they keep each payload until its result arrives and resubmit whatever a restarted control
plane does not know (see client.py), which gives them the same guarantee for free.
WAL with synchronous=NORMAL: durable against a crash of the process, which is the fault
this store is for (power loss may drop the last transactions).

The files stay bounded. A maintenance thread with its own connection checkpoints the WAL
(passive, once a second). When the WAL passes ``WAL_LIMIT`` the thread catches up with
passive checkpoints, then a RESTART checkpoint starts the WAL again from its beginning, even
while the loop keeps writing; the loop's next commit cuts the file back to ``WAL_LIMIT``
(journal_size_limit). In a quiet moment a TRUNCATE checkpoint takes it to zero bytes. Those
checkpoints, and the incremental vacuum steps that give the pages of pruned jobs back to the
file system, hold the write lock for a millisecond or two: a flush on the loop does not
wait for it (busy timeout 0) but keeps its writes queued, and runs again when the thread is
done. Past ``WAL_HOLD_FACTOR`` times the limit the loop holds its commits until the thread
has caught up (``HOLD_MAX`` at most), so the bound holds whatever the rate of writes. At
open, a WAL left by a killed process is checkpointed and truncated, and a database made
without ``auto_vacuum=INCREMENTAL`` is converted once (VACUUM).
"""

from __future__ import annotations

import json
import pickle
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHECKPOINT_EVERY = 1.0  # seconds between passive checkpoints
CHECK_EVERY = 0.1  # seconds between looks at the WAL's size, commits and free pages
WAL_LIMIT = 16 << 20  # bytes: a bigger WAL is started again, and its file cut back to this
WAL_HOLD_FACTOR = 4  # past this many WAL_LIMITs the loop holds its commits for the thread
HOLD_LOOK_EVERY = 8  # commits between two looks at the WAL's size from the loop
HOLD_MAX = 1.0  # seconds: how long at most (a reader elsewhere may block the checkpoint)
CATCH_UP_PASSES = 4  # passive checkpoints, at most, before the restarting one
VACUUM_MIN_FREE = 256  # free pages (1 MiB at 4 KiB) that start an incremental vacuum
VACUUM_STEP = 128  # pages per vacuum transaction: about a millisecond of write lock
VACUUM_STEPS = 8  # vacuum transactions per look, CHECK_EVERY apart: about 40 MB/s
VACUUM_PAUSE = 0.005  # seconds between two vacuum transactions: the loop commits meanwhile
RETRY_DELAY = 0.001  # seconds before a flush that met the write lock tries again
OPEN_BUSY_TIMEOUT = 5.0  # seconds: waiting for the write lock at open and close
THREAD_BUSY_TIMEOUT = 0.1  # seconds: the maintenance thread's wait for the lock or readers
TRIM_AFTER = 0.5  # seconds after a prune before the freed memory goes back (release_memory)

SCHEMA = """
CREATE TABLE IF NOT EXISTS endpoints (
    name TEXT PRIMARY KEY, config TEXT NOT NULL, config_hash TEXT NOT NULL,
    handler TEXT, created REAL NOT NULL, updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS functions (hash TEXT PRIMARY KEY, codec TEXT, blobs BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, endpoint TEXT NOT NULL, kind TEXT NOT NULL, status TEXT NOT NULL,
    fn TEXT, body BLOB, created REAL NOT NULL, started REAL, finished REAL,
    worker_id TEXT, retries INTEGER DEFAULT 0, cold INTEGER DEFAULT 0, cold_start_ms REAL,
    result BLOB, error TEXT, cost REAL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
CREATE TABLE IF NOT EXISTS ledger (
    worker_id TEXT NOT NULL, endpoint TEXT NOT NULL, hardware TEXT, emulated INTEGER,
    started REAL NOT NULL, stopped REAL NOT NULL, seconds INTEGER NOT NULL, cost REAL NOT NULL,
    bill TEXT, closed TEXT DEFAULT 'exit', seen REAL, price REAL
);
CREATE TABLE IF NOT EXISTS worker_states (
    bill TEXT NOT NULL, worker_id TEXT NOT NULL, endpoint TEXT NOT NULL, state TEXT NOT NULL,
    time REAL NOT NULL, note TEXT
);
CREATE INDEX IF NOT EXISTS worker_states_bill ON worker_states(bill);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class Store:
    def __init__(self, path: Path):
        self.path = path
        self.wal_path = Path(f"{path}-wal")
        self.wal_limit = WAL_LIMIT
        self.wal_hard_limit = WAL_HOLD_FACTOR * WAL_LIMIT
        self.wal_resets = 0  # RESTART and TRUNCATE checkpoints of the maintenance thread
        self.commits = 0
        self._restarted = -1  # self.commits at the thread's last RESTART checkpoint
        self.vacuumed_pages = 0
        self.deferred_commits = 0  # flushes that met the write lock and tried again
        self.held_commits = 0  # flushes held back while the WAL was over its hard limit
        self._hold_since: float | None = None
        self._since_look = 0  # flushes since _hold last looked at the WAL's size
        self._thread_writing = False  # the maintenance thread holds, or is taking, the lock
        self._in_commit = False  # the loop is in a transaction
        self._waiting_loop: Any = None  # the loop of a flush waiting for the thread
        self._closed = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._ops: list[tuple[str, tuple]] = []
        self._after: list[Callable[[], None]] = []
        self._trim_at: float | None = None  # when to give a prune's memory back (the thread)
        self.memory_trims = 0
        self._scheduled = False
        self._call_soon: Callable[[Callable[[], None]], Any] | None = None
        db = self.db = sqlite3.connect(
            str(path), isolation_level=None, check_same_thread=False, timeout=OPEN_BUSY_TIMEOUT
        )
        # auto_vacuum can only be chosen before the first table exists (or by a VACUUM).
        fresh = db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone() is None
        if fresh:
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        # A checkpoint syncs the database file: milliseconds. It runs in a thread of its
        # own (see _maintain), never inside a commit on the event loop.
        db.execute("PRAGMA wal_autocheckpoint=0")
        db.execute(f"PRAGMA journal_size_limit={int(self.wal_limit)}")
        # A WAL left by a killed process: into the database, and cut to zero bytes.
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        if not fresh and db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
            # Made before incremental vacuum: rewrite it once (0.3 s for 64 MB). Should that
            # fail (it needs as much free disk again), go on without giving space back.
            try:
                db.execute("PRAGMA auto_vacuum=INCREMENTAL")
                db.execute("VACUUM")
            except sqlite3.Error:
                pass
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        self.incremental = db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        db.executescript(SCHEMA)
        _migrate_ledger(db)
        self.page_size = db.execute("PRAGMA page_size").fetchone()[0]
        # From now on the loop never waits for the lock: see flush.
        db.execute("PRAGMA busy_timeout=0")
        self._thread = threading.Thread(target=self._maintain, name="sqlite-maintain", daemon=True)
        self._thread.start()

    def bind_loop(self, call_soon: Callable[[Callable[[], None]], Any]) -> None:
        self._call_soon = call_soon

    # -- group commit
    def write(self, sql: str, args: tuple = (), after: Callable[[], None] | None = None) -> None:
        self._ops.append((sql, args))
        if after is not None:
            self._after.append(after)
        if self._call_soon is None:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self._call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        self._waiting_loop = None
        if self._closed:
            return
        while self._ops:
            if self._thread_writing:
                # A truncating checkpoint or a vacuum step (a few ms): the thread calls
                # flush again when it is done. Not even trying keeps the loop from
                # getting in the way of the checkpoint's wait for readers.
                self.deferred_commits += 1
            elif self._hold():
                self.held_commits += 1
            else:
                ops, after = self._ops, self._after
                self._ops, self._after = [], []
                try:
                    done = self._commit(ops)
                except Exception as e:
                    self._salvage(ops, e)
                    done = True
                if done:
                    self.commits += 1
                    for cb in after:
                        cb()
                    return
                # Someone else holds the write lock: keep the writes, in order, and try
                # again shortly rather than wait on the loop.
                self._ops, self._after = ops + self._ops, after + self._after
                self.deferred_commits += 1
            if self._retry_later():
                return
            time.sleep(RETRY_DELAY)  # no loop to return to: wait here

    def _hold(self) -> bool:
        """Whether to hold the commit back: the WAL is past its hard limit and the thread is
        cutting it back. This bounds the WAL whatever the rate of writes; HOLD_MAX bounds
        the wait should the checkpoint be unable to finish."""
        # The size costs a system call: look every HOLD_LOOK_EVERY commits (a few hundred
        # KB of WAL at most in between), and at every try while holding.
        self._since_look += 1
        if self._hold_since is None and self._since_look < HOLD_LOOK_EVERY:
            return False
        self._since_look = 0
        size = _file_size(self.wal_path)
        if size > self.wal_limit and not self._wake.is_set():
            self._wake.set()  # the thread starts now, not at its next look
        if size <= self.wal_hard_limit or self._stop.is_set():
            self._hold_since = None
            return False
        now = time.monotonic()
        if self._hold_since is None:
            self._hold_since = now
        return now - self._hold_since < HOLD_MAX

    def _commit(self, ops: list[tuple[str, tuple]]) -> bool:
        """Run ``ops`` in one transaction. False when the write lock was busy (nothing done)."""
        db = self.db
        self._in_commit = True
        try:
            db.execute("BEGIN")
            try:
                for sql, args in ops:
                    db.execute(sql, args)
                db.execute("COMMIT")
            except BaseException as e:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if isinstance(e, sqlite3.OperationalError) and _busy(e):
                    return False
                raise
            return True
        finally:
            self._in_commit = False

    def _salvage(self, ops: list[tuple[str, tuple]], error: Exception) -> None:
        """A batch failed as a whole (not for the lock): commit its writes one by one, so
        one bad write does not take the others down, and say which failed. The batch's
        callbacks still run: whoever waits on them is never left hanging."""
        print(f"flash-jupyter: a database write failed ({error!r}); retrying one by one",
              file=sys.stderr, flush=True)  # fmt: skip
        for sql, args in ops:
            for _ in range(1000):  # the lock may be busy meanwhile: a second at most
                try:
                    if self._commit([(sql, args)]):
                        break
                except Exception as e:
                    print(f"flash-jupyter: dropped a database write: {sql.split('(')[0]!r}: "
                          f"{e!r}", file=sys.stderr, flush=True)  # fmt: skip
                    break
                time.sleep(RETRY_DELAY)

    def _retry_later(self) -> bool:
        if self._call_soon is None:
            return False
        import asyncio

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        self._scheduled = True
        self._waiting_loop = loop
        loop.call_later(RETRY_DELAY, self.flush)
        return True

    # -- endpoints
    def save_endpoint(self, name: str, config: dict, config_hash: str, handler: str | None,
                      created: float, updated: float) -> None:  # fmt: skip
        self.write(
            "INSERT INTO endpoints(name, config, config_hash, handler, created, updated) "
            "VALUES (?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET config=excluded.config, "
            "config_hash=excluded.config_hash, handler=excluded.handler, updated=excluded.updated",
            (name, json.dumps(config), config_hash, handler, created, updated),
        )

    def delete_endpoint(self, name: str) -> None:
        self.write("DELETE FROM endpoints WHERE name=?", (name,))

    def load_endpoints(self) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT name, config, handler, created, updated FROM endpoints")
        return [
            {"name": n, "config": json.loads(c), "handler": h, "created": cr, "updated": up}
            for n, c, h, cr, up in cur
        ]

    # -- functions (content-addressed, small)
    def save_function(self, h: str, codec: str, blobs: list[bytes]) -> None:
        self.write(
            "INSERT OR IGNORE INTO functions(hash, codec, blobs) VALUES (?,?,?)",
            (h, codec, pickle.dumps([bytes(b) for b in blobs], protocol=5)),
        )

    def prune_functions(self, keep: set[str]) -> None:
        """Forget functions no endpoint handler and no unfinished job needs."""
        have = {h for (h,) in self.db.execute("SELECT hash FROM functions")}
        for h in have - keep:
            self.write("DELETE FROM functions WHERE hash=?", (h,))

    def load_function(self, h: str) -> tuple[str, list[bytes]] | None:
        row = self.db.execute("SELECT codec, blobs FROM functions WHERE hash=?", (h,)).fetchone()
        return (row[0], pickle.loads(row[1])) if row else None

    # -- jobs
    def insert_job(self, job: Any, after: Callable[[], None] | None = None) -> None:
        self.write(
            "INSERT OR REPLACE INTO jobs(id, endpoint, kind, status, fn, body, created, retries) "
            "VALUES (?,?,?,?,?,?,?,?)",
            (job.id, job.endpoint, job.kind, job.status, job.fn, pickle.dumps(job.body, 5),
             job.created, job.retries),
            after,
        )  # fmt: skip

    def update_job(self, job: Any, with_result: bool = True) -> None:
        result = job.result if with_result else None
        self.write(
            "UPDATE jobs SET status=?, started=?, finished=?, worker_id=?, retries=?, cold=?, "
            "cold_start_ms=?, result=?, error=?, cost=? WHERE id=?",
            (job.status, job.started, job.finished, job.worker_id, job.retries, int(job.cold),
             job.cold_start_ms, None if result is None else pickle.dumps(result, 5),
             None if job.error is None else json.dumps(job.error, default=repr), job.cost,
             job.id),
        )  # fmt: skip

    def delete_job(self, job_id: str) -> None:
        self.write("DELETE FROM jobs WHERE id=?", (job_id,))

    def delete_jobs_before(self, t: float) -> None:
        self.write("DELETE FROM jobs WHERE finished IS NOT NULL AND finished < ?", (t,))
        # The pruned jobs' memory, freed on the loop by now, goes back to the system soon.
        self._trim_at = time.monotonic() + TRIM_AFTER

    _JOB_COLS = (
        "SELECT id, endpoint, kind, status, fn, body, created, started, finished, worker_id, "
        "retries, cold, cold_start_ms, result, error, cost FROM jobs "
    )

    def load_jobs(self, recent: int = 0) -> list[dict[str, Any]]:
        """Unfinished jobs, and the ``recent`` most recently finished ones, oldest first."""
        rows = list(self.db.execute(self._JOB_COLS + "WHERE finished IS NULL"))
        if recent:
            rows += self.db.execute(
                self._JOB_COLS + "WHERE finished IS NOT NULL ORDER BY finished DESC LIMIT ?",
                (recent,),
            ).fetchall()[::-1]
        rows.sort(key=lambda r: r[6])
        return [self._job_row(r) for r in rows]

    def load_job(self, job_id: str) -> dict[str, Any] | None:
        r = self.db.execute(self._JOB_COLS + "WHERE id=?", (job_id,)).fetchone()
        return self._job_row(r) if r else None

    def job_counts(self) -> dict[str, dict[str, int]]:
        """Finished jobs per endpoint: {"completed": n, "failed": m, "cancelled": k}
        (a cancel is the caller's choice, not a failure)."""
        out: dict[str, dict[str, int]] = {}
        kind = {"COMPLETED": "completed", "CANCELLED": "cancelled"}
        for ep, status, n in self.db.execute(
            "SELECT endpoint, status, COUNT(*) FROM jobs WHERE finished IS NOT NULL "
            "GROUP BY endpoint, status"
        ):
            d = out.setdefault(ep, {"completed": 0, "failed": 0, "cancelled": 0})
            d[kind.get(status, "failed")] += n
        return out

    @staticmethod
    def _job_row(r: tuple) -> dict[str, Any]:
        return {
            "id": r[0], "endpoint": r[1], "kind": r[2], "status": r[3], "fn": r[4],
            "body": pickle.loads(r[5]) if r[5] is not None else None,
            "created": r[6], "started": r[7], "finished": r[8], "worker_id": r[9],
            "retries": r[10], "cold": bool(r[11]), "cold_start_ms": r[12],
            "result": pickle.loads(r[13]) if r[13] is not None else None,
            "error": json.loads(r[14]) if r[14] else None, "cost": r[15] or 0.0,
        }  # fmt: skip

    # -- billing ledger: one row per worker lifetime (a "bill"), opened when its start is
    # asked for (closed NULL), its ``seen`` moved on at a low rate while the control plane
    # runs (one UPDATE for all open bills: ``ledger_seen``), closed when the process has
    # stopped (closed "exit") or, after a crash of the control plane, at the next start
    # from the last time it was known alive (closed "last_seen": ``close_open_bills``).
    # ``worker_states`` is each bill's state history (start, hello, end), from which
    # ``billing.audit`` recomputes the seconds independently of the ledger's sums.
    def open_bill(self, bill: str, worker_id: str, endpoint: str, hardware: str,
                  emulated: bool, started: float, price: float) -> None:  # fmt: skip
        self.write(
            "INSERT INTO ledger(worker_id, endpoint, hardware, emulated, started, stopped, "
            "seconds, cost, bill, closed, seen, price) VALUES (?,?,?,?,?,?,0,0,?,NULL,?,?)",
            (worker_id, endpoint, hardware, int(emulated), started, started, bill, started,
             price),
        )  # fmt: skip

    def refine_bill(self, bill: str, hardware: str, emulated: bool, price: float) -> None:
        """The provider refined an open bill's hardware (and so its price)."""
        self.write(
            "UPDATE ledger SET hardware=?, emulated=?, price=? WHERE bill=? AND closed IS NULL",
            (hardware, int(emulated), price, bill),
        )

    def void_bill(self, bill: str) -> None:
        """A start that went back to waiting for resources (Throttled): never billed."""
        self.write("DELETE FROM ledger WHERE bill=? AND closed IS NULL", (bill,))

    def close_bill(self, bill: str, hardware: str, emulated: bool, stopped: float,
                   seconds: int, cost: float, price: float, how: str = "exit") -> None:  # fmt: skip
        self.write(
            "UPDATE ledger SET hardware=?, emulated=?, stopped=?, seen=?, seconds=?, cost=?, "
            "price=?, closed=? WHERE bill=? AND closed IS NULL",
            (hardware, int(emulated), stopped, stopped, seconds, cost, price, how, bill),
        )

    def ledger_seen(self, now: float) -> None:
        """Every open bill's worker was alive at ``now``: one statement, whatever their number."""
        self.write("UPDATE ledger SET seen=? WHERE closed IS NULL", (now,))

    def worker_state(self, bill: str, worker_id: str, endpoint: str, state: str, t: float,
                     note: str | None = None) -> None:  # fmt: skip
        self.write(
            "INSERT INTO worker_states(bill, worker_id, endpoint, state, time, note) "
            "VALUES (?,?,?,?,?,?)",
            (bill, worker_id, endpoint, state, t, note),
        )

    def close_open_bills(self, seconds_of: Callable[[float, float], int]) -> list[dict[str, Any]]:
        """At start, before anything else is billed: the bills a killed control plane left
        open, closed at the last time their worker was known alive (``seen``), their state
        history ending there too. Their processes went with it (a worker exits when the wire
        drops). Committed now. Returns what was closed."""
        rows = self.db.execute(
            "SELECT bill, worker_id, endpoint, hardware, emulated, started, seen, price "
            "FROM ledger WHERE closed IS NULL"
        ).fetchall()
        out = []
        for bill, wid, ep, hw, emulated, started, seen, price in rows:
            stopped = max(started, seen if seen is not None else started)
            secs = seconds_of(started, stopped)
            cost = secs * (price or 0.0)
            out.append({"bill": bill, "worker_id": wid, "endpoint": ep, "hardware": hw,
                        "emulated": bool(emulated), "started": started, "stopped": stopped,
                        "seconds": secs, "cost": cost, "closed": "last_seen"})  # fmt: skip
            if bill is None:  # cannot happen (rows without a bill are closed): be safe
                continue
            self.close_bill(bill, hw, bool(emulated), stopped, secs, cost, price or 0.0,
                            "last_seen")  # fmt: skip
            self.worker_state(bill, wid, ep, "Exited", stopped,
                              "control plane died; closed at the next start, at the last "
                              "time the worker was known alive")  # fmt: skip
        self.flush()
        return out

    def ledger_total(self, endpoint: str, since: float) -> dict[str, float]:
        """Billed seconds and cost of an endpoint's closed bills for workers started since
        ``since`` (its creation: an older, deleted endpoint of the same name is not its
        bill). Open bills are live workers, which the views count up to now."""
        s, c = self.db.execute(
            "SELECT SUM(seconds), SUM(cost) FROM ledger WHERE endpoint=? AND started>=? "
            "AND closed IS NOT NULL",
            (endpoint, since),
        ).fetchone()
        return {"seconds": s or 0, "cost": c or 0.0}

    def ledger_closed(self, endpoint: str, since: float) -> dict[str, int]:
        """How an endpoint's bills were closed: {"exit": n, "last_seen": m}."""
        out = {"exit": 0, "last_seen": 0}
        for how, n in self.db.execute(
            "SELECT closed, COUNT(*) FROM ledger WHERE endpoint=? AND started>=? "
            "AND closed IS NOT NULL GROUP BY closed",
            (endpoint, since),
        ):
            out[how] = n
        return out

    # -- control plane settings (the budget's limits): small JSON values by key
    def save_setting(self, key: str, value: Any) -> None:
        self.write(
            "INSERT INTO settings(key, value) VALUES (?,?) "
            "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, json.dumps(value)),
        )

    def load_setting(self, key: str) -> Any:
        row = self.db.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    # -- size
    def sizes(self) -> dict[str, int]:
        """What the database takes on disk, for /v1/info."""
        return {
            "db_bytes": _file_size(self.path),
            "wal_bytes": _file_size(self.wal_path),
            "page_size": self.page_size,
            "free_pages": self.db.execute("PRAGMA freelist_count").fetchone()[0],
            "incremental_vacuum": self.incremental,
            "wal_limit_bytes": self.wal_limit,
            "wal_resets": self.wal_resets,
            "vacuumed_pages": self.vacuumed_pages,
            "deferred_commits": self.deferred_commits,
            "held_commits": self.held_commits,
            "memory_trims": self.memory_trims,  # release_memory() after a prune
        }

    # -- maintenance thread: checkpoints and incremental vacuum, on a connection of its own
    def _maintain(self) -> None:
        db = sqlite3.connect(
            str(self.path), isolation_level=None, check_same_thread=False,
            timeout=THREAD_BUSY_TIMEOUT,
        )  # fmt: skip
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA wal_autocheckpoint=0")
        db.execute(f"PRAGMA journal_size_limit={int(self.wal_limit)}")
        last_checkpoint = time.monotonic()
        commits = self.commits
        vacuuming = False
        while True:
            self._wake.wait(CHECK_EVERY)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                wal = _file_size(self.wal_path)
                idle, commits = self.commits == commits, self.commits
                if wal > self.wal_limit:
                    self._reset_wal(db)
                    last_checkpoint = time.monotonic()
                elif idle and wal:
                    self._truncate_wal(db)
                    last_checkpoint = time.monotonic()
                elif time.monotonic() - last_checkpoint >= CHECKPOINT_EVERY:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    last_checkpoint = time.monotonic()
                # Pages of deleted rows back to the file system, from VACUUM_MIN_FREE free
                # pages down to none, a few at a time: each step is a transaction of about
                # a millisecond. (executescript runs the pragma to its end; execute would
                # free one page.)
                free = db.execute("PRAGMA freelist_count").fetchone()[0]
                vacuuming = self.incremental and free >= (1 if vacuuming else VACUUM_MIN_FREE)
                for _ in range(VACUUM_STEPS if vacuuming else 0):
                    with self._writing():
                        db.executescript(f"PRAGMA incremental_vacuum({VACUUM_STEP})")
                    left = db.execute("PRAGMA freelist_count").fetchone()[0]
                    self.vacuumed_pages += max(0, free - left)
                    if not left or left >= free:
                        vacuuming = False  # done (or stuck: not again before MIN_FREE)
                        break
                    free = left
                    if self._stop.wait(VACUUM_PAUSE):
                        break
                if self._trim_at is not None and time.monotonic() >= self._trim_at:
                    self._trim_at = None
                    self.memory_trims += release_memory()
            except Exception:  # never let the thread die: the next look tries again
                pass
        db.close()

    def _reset_wal(self, db: sqlite3.Connection) -> None:
        """Under load: copy the WAL into the database so that it starts again from its
        beginning, holding the write lock for a millisecond or two."""
        if _file_size(self.wal_path) <= self.wal_hard_limit and self.commits == self._restarted:
            return  # done already: the loop's next commit starts the WAL again
        small = self.wal_limit // 8
        for attempt in range(CATCH_UP_PASSES):
            # The bulk, without blocking anyone: each pass copies what was written during
            # the one before, until that is small (or the WAL outgrows us anyway).
            before = _file_size(self.wal_path)
            db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            copied = _file_size(self.wal_path)
            if copied < before:
                return  # caught up between two commits: the loop started the WAL again
            if copied - before > small and attempt < CATCH_UP_PASSES - 1:
                continue
            # The rest under the write lock: the last frames and two syncs; the loop's
            # commits wait meanwhile (the loop does not). A RESTART leaves the file as it
            # is: the loop's next commit writes from the start of the file and cuts it back
            # to the limit (journal_size_limit), which costs it the ftruncate of the
            # overshoot only. Past the hard limit the loop is holding its commits: there a
            # TRUNCATE cuts the file itself.
            with self._writing():
                tail = _file_size(self.wal_path) - copied
                if tail < 0:
                    return  # the loop started the WAL again (and cut the file back)
                if tail > small and attempt < CATCH_UP_PASSES - 1:
                    continue  # a big commit came in: copy it without holding the loop
                truncate = _file_size(self.wal_path) > self.wal_hard_limit
                mode = "TRUNCATE" if truncate else "RESTART"
                busy = db.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()[0]
            if not busy:
                self.wal_resets += 1
                self._restarted = self.commits
            return

    def _truncate_wal(self, db: sqlite3.Connection) -> None:
        """In a quiet moment (no commit since the last look): the WAL down to zero bytes."""
        commits = self.commits
        db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()  # the copying and syncing
        with self._writing():
            if self.commits != commits:
                return  # not so quiet after all
            busy = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        self.wal_resets += not busy

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """The thread is about to write: the loop's flushes wait until it is done (without
        trying, so they do not get in the way of the checkpoint's wait for readers)."""
        self._thread_writing = True
        try:
            while self._in_commit:  # the loop's transaction under way ends first
                time.sleep(0.0002)
            yield
        finally:
            self._thread_writing = False
            loop = self._waiting_loop
            if loop is not None:
                try:
                    loop.call_soon_threadsafe(self.flush)
                except RuntimeError:  # closed meanwhile
                    pass

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        self.db.execute(f"PRAGMA busy_timeout={int(OPEN_BUSY_TIMEOUT * 1000)}")
        self._call_soon = None  # commit here and now
        self.flush()
        self._closed = True
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.db.close()


def _migrate_ledger(db: sqlite3.Connection) -> None:
    """A ledger made before bills were opened at start: add the columns (its rows are all
    closed at a process exit: ``closed`` defaults to "exit"), and the index on ``bill``."""
    have = {r[1] for r in db.execute("PRAGMA table_info(ledger)")}
    for col, decl in (("bill", "TEXT"), ("closed", "TEXT DEFAULT 'exit'"), ("seen", "REAL"),
                      ("price", "REAL")):  # fmt: skip
        if col not in have:
            db.execute(f"ALTER TABLE ledger ADD COLUMN {col} {decl}")
    db.execute("CREATE UNIQUE INDEX IF NOT EXISTS ledger_bill ON ledger(bill)")
    db.execute("CREATE INDEX IF NOT EXISTS ledger_open ON ledger(closed)")


def release_memory() -> int:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``): 1 if done.

    Python frees a pruned job's objects, but the allocator keeps the pages for reuse, so
    the control plane's RSS would stay at its peak after a burst of jobs has expired
    (measured by scripts/load.py: +17 MiB after 6,000 jobs, and growing with the burst).
    Elsewhere than glibc (macOS, musl): nothing. About a millisecond, off the event loop."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        import ctypes

        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return 0
    trim(0)
    return 1


def _busy(e: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY, or one of its extended codes: the write lock is someone else's."""
    code = getattr(e, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF == 5  # SQLITE_BUSY
    return "database is locked" in str(e) or "busy" in str(e)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
