"""SQLite persistence of endpoints, jobs, workers, functions and the billing ledger.

Writes are queued and committed together once per event-loop turn (group commit), so a
burst of 2,000 submissions costs a handful of transactions. An HTTP /run is answered only
after the transaction holding its job has committed, so a control plane that stops after
answering still has the job when it comes back. Wire clients do not wait for the commit:
they keep each payload until its result arrives and resubmit whatever a restarted control
plane does not know (see client.py), which gives them the same guarantee for free.
WAL with synchronous=NORMAL: durable against a crash of the process, which is the fault
this store is for (power loss may drop the last transactions).
"""

from __future__ import annotations

import json
import pickle
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHECKPOINT_EVERY = 1.0  # seconds

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
    started REAL NOT NULL, stopped REAL NOT NULL, seconds INTEGER NOT NULL, cost REAL NOT NULL
);
"""


class Store:
    def __init__(self, path: Path):
        self.path = path
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        # A checkpoint syncs the database file: milliseconds. It runs in a thread of its
        # own (see _checkpointer), never inside a commit on the event loop.
        self.db.execute("PRAGMA wal_autocheckpoint=0")
        self.db.executescript(SCHEMA)
        self._stop = threading.Event()
        threading.Thread(target=self._checkpointer, name="sqlite-checkpoint", daemon=True).start()
        self._ops: list[tuple[str, tuple]] = []
        self._after: list[Callable[[], None]] = []
        self._scheduled = False
        self._call_soon: Callable[[Callable[[], None]], Any] | None = None

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
        ops, after = self._ops, self._after
        self._ops, self._after = [], []
        if ops:
            self.db.execute("BEGIN")
            try:
                for sql, args in ops:
                    self.db.execute(sql, args)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        for cb in after:
            cb()

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

    def delete_jobs_before(self, t: float) -> None:
        self.write("DELETE FROM jobs WHERE finished IS NOT NULL AND finished < ?", (t,))

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
        """Finished jobs per endpoint: {"completed": n, "failed": m}."""
        out: dict[str, dict[str, int]] = {}
        for ep, status, n in self.db.execute(
            "SELECT endpoint, status, COUNT(*) FROM jobs WHERE finished IS NOT NULL "
            "GROUP BY endpoint, status"
        ):
            d = out.setdefault(ep, {"completed": 0, "failed": 0})
            d["completed" if status == "COMPLETED" else "failed"] += n
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

    # -- billing ledger
    def add_ledger(self, worker_id: str, endpoint: str, hardware: str, emulated: bool,
                   started: float, stopped: float, seconds: int, cost: float) -> None:  # fmt: skip
        self.write(
            "INSERT INTO ledger VALUES (?,?,?,?,?,?,?,?)",
            (worker_id, endpoint, hardware, int(emulated), started, stopped, seconds, cost),
        )

    def ledger_total(self, endpoint: str, since: float) -> dict[str, float]:
        """Billed seconds and cost of an endpoint's workers started since ``since`` (its
        creation: an older, deleted endpoint of the same name is not its bill)."""
        s, c = self.db.execute(
            "SELECT SUM(seconds), SUM(cost) FROM ledger WHERE endpoint=? AND started>=?",
            (endpoint, since),
        ).fetchone()
        return {"seconds": s or 0, "cost": c or 0.0}

    def _checkpointer(self) -> None:
        db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        while not self._stop.wait(CHECKPOINT_EVERY):
            try:
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error:
                pass
        db.close()

    def close(self) -> None:
        self.flush()
        self._stop.set()
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.db.close()
