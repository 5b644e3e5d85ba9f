"""Control plane crash: kill -9 the control plane with N jobs accepted, most queued and some
running, submitted from Python clients and over HTTP /run; start it again; every accepted job
completes (or is retrievable), and the billing ledger stays consistent.

It starts a private control plane (scripts/soak_kills.py's ``ControlPlane``), deploys one
endpoint (``workers=(0, 2)``; each job waits for a gate file that the script creates once the
control plane is back, sleeps ``--job-time``, appends its index to a file, and returns twice
its index: so at the kill two jobs are running and all the others queued), submits half the
jobs from ``--clients`` Python client processes and half with HTTP ``POST /v2/{name}/run`` (8
threads), and sends the control plane SIGKILL as soon as the last one is accepted. It starts it
again on the same data directory and ports, and checks:

  python       every Python job's result is its value (each client reconnects, re-deploys,
               ``watch``es its jobs and resubmits what the new control plane does not know)
  http         every /run job id answers COMPLETED with its output on /status
  ran once     every job ran to its end exactly once (each run logs its start and its end);
               shown: how many started twice (those running at the crash start again: their
               first run died with the control plane's workers)
  bills        the bills the dead control plane left open (read from flash.db between the kill
               and the restart) are exactly those closed "last_seen" at the next start
               (/v1/billing's ``recovered``); after a clean stop, ``audit``: every bill
               recomputed from its state history equals the ledger, no overlap, none open

It prints one summary table and exits 0 when every check passed, 1 otherwise. ``--full`` is the
issue's run (1,000 jobs). Without it, a short run (CI: tests/test_reliability_faults.py).

    .venv/bin/python scripts/crash_restart.py            # short
    .venv/bin/python scripts/crash_restart.py --full     # 1,000 jobs
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak_kills import (
    FAIL,
    PASS,
    TERMINAL,
    ControlPlane,
    audit_check,
    run_checks,
    wait_until,
)


def open_bills(db: Path) -> set[str]:
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {b for (b,) in c.execute("SELECT bill FROM ledger WHERE closed IS NULL")}
    finally:
        c.close()


# Each Python client is a process of its own (its own wire connection, its own resubmission):
# it submits its share, says so (a marker file), waits for every result and writes them out.
CLIENT = """
import json, sys
from flash_jupyter import Endpoint

name, first, count, t, log, out, timeout = sys.argv[1:8]
first, count, t, timeout = int(first), int(count), float(t), float(timeout)


@Endpoint(name=name, workers=(0, 2), idle_timeout=30)
def step(i, t, log):
    import os
    import time

    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, f"s{i}\\n".encode())  # a run starts
    os.close(fd)
    deadline = time.monotonic() + 120  # held until the control plane is back
    while not os.path.exists(log + ".gate") and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(t)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, f"{i}\\n".encode())
    os.close(fd)
    return i * 2


jobs = [(i, step.submit(i, t, log)) for i in range(first, first + count)]
open(out + ".submitted", "w").close()
res = {}
for i, job in jobs:
    try:
        res[i] = ["ok", job.result(timeout=timeout)]
    except Exception as e:
        res[i] = ["error", f"{type(e).__name__}: {e}"[:200]]
with open(out, "w") as f:
    json.dump(res, f)
"""


def crash(a: argparse.Namespace, work: Path) -> tuple[list[list[str]], bool]:
    from flash_jupyter import Endpoint
    from flash_jupyter import client as fj_client

    cp = ControlPlane(work).start()
    rows: list[list[str]] = []
    ok = True
    ran = work / "ran"

    def check(name: str, good: bool, detail: str) -> None:
        nonlocal ok
        ok = ok and good
        rows.append([name, PASS if good else FAIL, detail])
        print(f"  {name}: {PASS if good else FAIL}  {detail}", flush=True)

    try:
        client = cp.use()
        name = "crash-restart"

        @Endpoint(name=name, workers=(0, 2), idle_timeout=30)
        def step(i: int, t: float, log: str) -> int:
            import os
            import time

            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            os.write(fd, f"s{i}\n".encode())  # a run starts
            os.close(fd)
            deadline = time.monotonic() + 120  # held until the control plane is back
            while not os.path.exists(log + ".gate") and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(t)
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            os.write(fd, f"{i}\n".encode())
            os.close(fd)
            return i * 2

        step.deploy()  # the HTTP handler (each Python client deploys the same settings too)
        n_py = a.jobs // 2
        n_http = a.jobs - n_py
        program = work / "client.py"
        program.write_text(CLIENT)
        env = {**os.environ, "FLASH_JUPYTER_RECEIPTS": "0"}
        clients = []
        share = [n_py // a.clients + (k < n_py % a.clients) for k in range(a.clients)]
        first = 0
        for k, count in enumerate(share):
            out = work / f"client-{k}.json"
            with open(work / f"client-{k}.log", "wb") as log:
                proc = subprocess.Popen(
                    [sys.executable, str(program), name, str(first), str(count),
                     str(a.job_time), str(ran), str(out), str(a.timeout)],
                    env=env, stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip
            clients.append((proc, out))
            first += count

        def post(i: int) -> str:
            with cp.http() as h:
                r = h.post(f"/v2/{name}/run",
                           json={"input": {"i": i, "t": a.job_time, "log": str(ran)}})  # fmt: skip
                r.raise_for_status()
                return r.json()["id"]

        with ThreadPoolExecutor(8) as pool:
            http_ids = list(pool.map(post, range(n_py, a.jobs)))
        wait_until(lambda: all(Path(f"{o}.submitted").exists() or p.poll() is not None
                               for p, o in clients), 120, "the Python clients")  # fmt: skip
        health = client.health(name)["jobs"]
        cp.kill()
        t_kill, killed_at = time.monotonic(), time.time()
        left_open = open_bills(cp.db)
        done_before = sum(1 for x in ran.read_text().split() if not x.startswith("s"))
        print(f"  killed with {health['inQueue']} queued, {health['inProgress']} running, "
              f"{health['completed']} completed; {len(left_open)} bills open",
              flush=True)  # fmt: skip
        cp.start()
        t_up = time.monotonic()
        Path(f"{ran}.gate").touch()

        bad = []
        results: dict[int, Any] = {}
        for proc, out in clients:
            try:
                proc.wait(a.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if out.exists():
                results.update({int(k): v for k, v in json.loads(out.read_text()).items()})
            else:
                bad.append(f"client {out.stem} exited {proc.returncode} without its results")
        for i in range(n_py):
            got = results.get(i)
            if got != ["ok", i * 2]:
                bad.append(f"job {i}: {got!r}")
        check("python", not bad, f"{n_py - len(bad)} of {n_py} results right, from "
              f"{a.clients} client processes" + (f"; {bad[:3]}" if bad else ""))  # fmt: skip

        with cp.http() as h:

            def statuses() -> list[dict[str, Any]] | None:
                st = [h.get(f"/v2/{name}/status/{j}").json() for j in http_ids]
                return st if all(s.get("status") in TERMINAL for s in st) else None

            st = wait_until(statuses, a.timeout, "the HTTP jobs")
            bill = h.get("/v1/billing").json()
        wrong = [s for k, s in zip(range(n_py, a.jobs), st, strict=True)
                 if s.get("status") != "COMPLETED" or s.get("output") != k * 2]  # fmt: skip
        check("http", not wrong, f"{n_http - len(wrong)} of {n_http} COMPLETED with their output"
              + (f"; {wrong[:2]}" if wrong else ""))  # fmt: skip
        elapsed = time.monotonic() - t_up
        lines = ran.read_text().split()
        ends = Counter(x for x in lines if not x.startswith("s"))
        starts = Counter(x[1:] for x in lines if x.startswith("s"))
        twice = sum(1 for v in ends.values() if v > 1)
        never = a.jobs - len(ends)
        restarted = sum(1 for v in starts.values() if v > 1)
        check("ran once", never == 0 and twice == 0,
              f"{a.jobs - never - twice} jobs ran to their end once, {twice} twice, {never} "
              f"never; {restarted} started again after the crash ({done_before} ended before "
              f"it); all done {elapsed:.1f} s after the restart (down "
              f"{t_up - t_kill:.1f} s)")  # fmt: skip

        recovered = {r["worker_id"] for r in bill["recovered"]}
        fj_client.reset_client()
        cp.stop()
        good, detail, au = audit_check(cp)
        closed_last = {r["worker_id"] for b, r in au["bills"].items() if b in left_open}
        same = all(au["bills"].get(b, {}).get("closed") == "last_seen" for b in left_open)
        gaps = [killed_at - au["bills"][b]["stopped"] for b in left_open if b in au["bills"]]
        gap = f"last seen {max(gaps):.2f} s at most before the kill; " if gaps else ""
        check("bills", good and same and recovered == closed_last,
              f"{len(left_open)} left open by the crash, closed last_seen at the restart "
              f"({sorted(recovered)}); {gap}{detail}")  # fmt: skip
    finally:
        fj_client.reset_client()
        cp.stop()
    return rows, ok


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--jobs", type=int, default=100, help="jobs, half Python, half HTTP (100)")
    p.add_argument(
        "--clients",
        type=int,
        default=2,
        help="Python client processes sharing the Python half (2; --full: 4)",
    )
    p.add_argument("--job-time", type=float, default=0.05, help="seconds each job sleeps (0.05)")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the jobs")
    p.add_argument("--work-dir", type=Path, default=None, help="where the data dir goes")
    p.add_argument("--keep", action="store_true", help="keep the data dir after a pass")
    p.add_argument("--full", action="store_true", help="the issue's run: 1,000 jobs")
    a = p.parse_args(argv)
    if a.full:
        a.jobs, a.clients = max(a.jobs, 1000), max(a.clients, 4)
    if a.jobs < 2 or a.job_time < 0 or not 1 <= a.clients <= a.jobs // 2:
        p.error("--jobs must be 2 or more, --job-time 0 or more, --clients 1 to jobs / 2")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="crash-restart-", dir=a.work_dir))
    print(f"crash_restart: {a.jobs} jobs of {a.job_time} s (half Python, half HTTP /run), "
          f"SIGKILL of the control plane once all are accepted; data in {work}",
          flush=True)  # fmt: skip
    return run_checks(lambda: crash(a, work), work, a.keep)


if __name__ == "__main__":
    sys.exit(main())
