"""What the store's maintenance (checkpoints, WAL truncation, incremental vacuum) costs the
event loop: the time spent inside flush() (the loop is stalled), the commit latency (write
to its callback: what an HTTP /run waits for), the loop's lateness, and the WAL's size.

    .venv/bin/python bench/store_stall.py [--rate 6000] [--seconds 5] [--prune]

The load is that of a control plane taking ``rate`` jobs a second: each job's row is
inserted (the callback stands for the answer to /run) and, 2 ms later, updated with its
outcome. With --prune, the finished rows are then deleted, as ControlPlane._prune does, and
the load goes on while the maintenance thread vacuums the freed pages.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pickle
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flash_jupyter.server import store as store_mod
from flash_jupyter.server.store import Store

WINDOWS: list[float] = []  # how long the maintenance thread held the write lock, each time
_writing = getattr(Store, "_writing", None)
if _writing is not None:

    @contextmanager
    def timed_writing(self: Store) -> Iterator[None]:
        t = time.perf_counter()
        with _writing(self):
            yield
        WINDOWS.append(time.perf_counter() - t)

    Store._writing = timed_writing


def wal_bytes(store: Store) -> int:
    try:
        return os.path.getsize(f"{store.path}-wal")
    except FileNotFoundError:
        return 0


def sizes(store: Store) -> dict:
    if hasattr(store, "sizes"):
        return store.sizes()
    return {"db_bytes": os.path.getsize(store.path), "wal_bytes": wal_bytes(store)}


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def line(name: str, xs: list[float]) -> str:
    ms = [x * 1e3 for x in xs]
    return (
        f"{name:<16} n={len(ms):<7} p50={pct(ms, 50):7.3f} p99={pct(ms, 99):7.3f} "
        f"p99.9={pct(ms, 99.9):7.3f} max={max(ms, default=0):8.3f} ms"
    )


async def run(store: Store, rate: int, seconds: float, prune: bool) -> dict:
    loop = asyncio.get_running_loop()
    store.bind_loop(loop.call_soon)
    flushes: list[float] = []
    commits: list[float] = []
    lateness: list[float] = []
    wal_max = 0
    real_flush = store.flush

    def timed_flush() -> None:
        t = time.perf_counter()
        real_flush()
        flushes.append(time.perf_counter() - t)

    store.flush = timed_flush  # what write() schedules, and what a deferred retry calls
    n = 0
    body = pickle.dumps({"input": {"x": list(range(20))}}, 5)

    def submit() -> None:
        nonlocal n
        job = SimpleNamespace(
            id=f"job-{n}", endpoint="ep", kind="json", status="IN_QUEUE", fn=None, body=body,
            created=time.time(), retries=0, started=None, finished=None, worker_id=None,
            cold=False, cold_start_ms=None, result=None, error=None, cost=0.0,
        )  # fmt: skip
        n += 1
        t = time.perf_counter()
        store.insert_job(job, after=lambda: commits.append(time.perf_counter() - t))
        job.status, job.started, job.finished, job.result = "COMPLETED", t, time.time(), 42
        loop.call_later(0.002, store.update_job, job)

    async def load(duration: float) -> None:
        nonlocal wal_max
        end = time.monotonic() + duration
        due = time.monotonic()
        while time.monotonic() < end:
            t = time.monotonic()
            await asyncio.sleep(0.001)
            lateness.append(max(0.0, time.monotonic() - t - 0.001))
            while due < time.monotonic():
                submit()
                due += 1 / rate
            wal_max = max(wal_max, wal_bytes(store))

    await load(seconds)
    out = {"jobs": n, "flush": flushes[:], "commit": commits[:], "late": lateness[:]}
    out["wal_max"] = wal_max
    out["windows"] = WINDOWS[:]
    if prune:
        for xs in (flushes, commits, lateness):
            xs.clear()
        wal_max = 0
        await asyncio.sleep(0.1)
        before = sizes(store)
        WINDOWS.clear()
        store.delete_jobs_before(time.time())
        await load(seconds)
        out.update(prune_flush=flushes, prune_commit=commits, prune_late=lateness)
        out.update(prune_before=before, prune_wal_max=wal_max, prune_windows=WINDOWS[:])
    while store._ops:
        await asyncio.sleep(0.001)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=int, default=6000, help="jobs a second")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--prune", action="store_true")
    ap.add_argument("--dir", default=None, help="where flash.db goes (a fresh temp dir)")
    ap.add_argument("--wal-limit", type=int, default=None, help="bytes (WAL_LIMIT)")
    a = ap.parse_args()
    if a.wal_limit:
        store_mod.WAL_LIMIT = a.wal_limit
    d = Path(a.dir or tempfile.mkdtemp(prefix="store-stall-"))
    store = Store(d / "flash.db")
    r = asyncio.run(run(store, a.rate, a.seconds, a.prune))
    print(f"{r['jobs']} jobs in {a.seconds:g} s; WAL at most {r['wal_max'] / 1e6:.1f} MB")
    print(line("flush (stall)", r["flush"]))
    print(line("commit latency", r["commit"]))
    print(line("loop lateness", r["late"]))
    print(line("thread lock", r["windows"]))
    if a.prune:
        print(f"prune: before {r['prune_before']}; WAL at most {r['prune_wal_max'] / 1e6:.1f} MB")
        print(line("flush (stall)", r["prune_flush"]))
        print(line("commit latency", r["prune_commit"]))
        print(line("loop lateness", r["prune_late"]))
        print(line("thread lock", r["prune_windows"]))
    print("after:", sizes(store))
    print("commit latency mean", round(statistics.fmean(r["commit"] or [0]) * 1e3, 3), "ms")
    store.close()
    print("closed:", os.path.getsize(d / "flash.db"), "bytes")


if __name__ == "__main__":
    main()
