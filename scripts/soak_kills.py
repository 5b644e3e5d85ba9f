"""Worker kills soak: SIGKILL a random worker every few seconds while N jobs run on
``workers=(0, 4)``, and show that nothing is lost or delivered twice.

It starts a private control plane (its own data directory, ports and token), submits N jobs
from a Python client (each sleeps ``--job-time`` and returns its index; ``--suicidal`` of them,
spread evenly, SIGKILL their own worker every time they run instead), and while they run a
killer thread picks a random worker that has a process and sends it SIGKILL every ``--every``
seconds. A reader of ``/v1/events`` counts each job's terminal events. At the end it checks:

  outcome      every job ended COMPLETED with its own value, or FAILED with the crash reason
               (WorkerLost: "... SIGKILL ... giving up after 2 retries") after the retry limit;
               the suicidal ones all FAILED so, each after 3 runs (2 retries + the first)
  lost         none: every job has an outcome, and health counts completed + failed = N
  twice        none: each job has exactly one terminal event (the event stream has no gap)
  retried      /v2/{name}/health's ``retried`` = the sum of every job's ``retries``, and
               retried - 3 x suicidal <= the kills. "Matches" means exactly this: a worker's
               death adds one to ``retried`` when it was running a job (max_concurrency 1: one
               job), and nothing when it was idle or still starting; so retried = the killer's
               kills that hit a running job + the suicidal jobs' own 3 deaths each, and each
               such death is one retry of one job. (A killer cannot know for sure that a worker
               it saw busy still was at the kill: "kills seen busy" is shown, not checked.)
  billing      after a clean stop, scripts' audit of flash.db (server/billing.py ``audit``):
               every worker lifetime's bill recomputed from its state history equals the ledger,
               none overlaps another of its slot, none is left open; as many bills as starts

It prints one summary table and exits 0 when every check passed, 1 otherwise. ``--full`` is
the issue's run (1,000 jobs). Without it, a short run (CI: tests/test_reliability_faults.py).

    .venv/bin/python scripts/soak_kills.py            # short
    .venv/bin/python scripts/soak_kills.py --full     # 1,000 jobs, a kill every 2 s
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from script_kit import free_port, run_checks, wait_until

PASS, FAIL = "pass", "FAIL"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}


# ---------------------------------------------------------------- shared with crash_restart.py


class ControlPlane:
    """A private control plane process: started, killed (SIGKILL) and started again on the
    same data directory, ports and token (so clients find it again)."""

    def __init__(self, work: Path, **env: str):
        self.home = Path(tempfile.mkdtemp(prefix="cp-", dir=work))
        os.chmod(self.home, 0o700)
        self.token = secrets.token_urlsafe(24)
        self.port, self.wire_port = free_port(), free_port()
        self.env = env
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db(self) -> Path:
        return self.home / "flash.db"

    def start(self, timeout: float = 60) -> ControlPlane:
        ready = self.home / f"ready-{secrets.token_hex(4)}.json"
        cmd = [sys.executable, "-m", "flash_jupyter.server", "--host", "127.0.0.1",
               "--port", str(self.port), "--wire-port", str(self.wire_port),
               f"--token={self.token}", "--data-dir", str(self.home),
               "--exit-with-parent", str(os.getpid()), "--ready-file", str(ready)]  # fmt: skip
        env = {**os.environ, "FLASH_JUPYTER_HOME": str(self.home), **self.env}
        env.pop("FLASH_JUPYTER_URL", None)
        with open(self.home / "server.log", "ab") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: self.proc.poll() is not None or ready.exists(), timeout,
                   "the control plane")  # fmt: skip
        if self.proc.poll() is not None:
            raise RuntimeError(f"the control plane did not start: {self.log()[-500:]}")
        wait_until(self._pings, timeout, "the HTTP API")
        return self

    def _pings(self) -> bool:
        try:
            return httpx.get(self.url + "/ping", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """SIGKILL: a crash, nothing closed, nothing flushed beyond what was committed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        try:
            return (self.home / "server.log").read_text(errors="replace")
        except OSError:
            return ""

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60,
                            headers={"Authorization": f"Bearer {self.token}"})  # fmt: skip

    def use(self) -> Any:
        """This process's flash_jupyter client, pointed at this control plane."""
        from flash_jupyter import client as fj_client

        os.environ["FLASH_JUPYTER_URL"] = self.url
        os.environ["FLASH_JUPYTER_TOKEN"] = self.token
        fj_client.reset_client()
        return fj_client.get_client()


class EventCounter:
    """Reads /v1/events in a thread (reconnecting after a restart): terminal events per job
    id, and the gaps in the event sequence (events the control plane dropped)."""

    def __init__(self, cp: ControlPlane):
        self.cp = cp
        self.terminal: Counter[str] = Counter()
        self.gaps = 0
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._connected.wait(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            last = None
            try:
                with self.cp.http() as h, h.stream("GET", "/v1/events", timeout=None) as r:
                    for line in r.iter_lines():
                        if self._stop.is_set():
                            return
                        if not line.startswith("data: "):
                            continue
                        ev = json.loads(line[6:])
                        if ev.get("type") == "snapshot":
                            self._connected.set()
                            continue
                        seq = ev.get("seq")
                        if last is not None and seq is not None and seq != last + 1:
                            self.gaps += seq - last - 1
                        last = seq
                        if ev.get("type") == "job" and ev.get("status") in TERMINAL:
                            self.terminal[ev["id"]] += 1
            except (httpx.HTTPError, OSError, ValueError):
                time.sleep(0.1)  # the control plane restarts: read again from its start

    def stop(self) -> None:
        self._stop.set()


def audit_check(cp: ControlPlane) -> tuple[bool, str, dict[str, Any]]:
    """After a clean stop: the billing audit of the control plane's flash.db."""
    from flash_jupyter.server.billing import audit

    a = audit(cp.db)
    bad = a["mismatches"] + a["overlaps"] + [f"{b}: left open" for b in a["open"]]
    closed = ", ".join(f"{k} {v}" for k, v in sorted(a["closed"].items(), key=str))
    detail = f"{len(a['bills'])} bills ({closed}), " + (
        f"{len(bad)} problems: {bad[:3]}" if bad else "history = ledger, no overlap, none open"
    )
    return not bad, detail, a


# ---------------------------------------------------------------- the soak


class Killer(threading.Thread):
    """SIGKILLs a random worker with a process every ``every`` seconds."""

    def __init__(self, cp: ControlPlane, name: str, every: float, seed: int):
        super().__init__(daemon=True)
        self.cp, self.name, self.every = cp, name, every
        self.rng = random.Random(seed)
        self.kills = 0
        self.busy = 0  # kills of a worker the view showed busy just before
        self.done = threading.Event()

    def run(self) -> None:
        with self.cp.http() as h:
            while not self.done.wait(self.every):
                try:
                    ws = h.get(f"/v1/endpoints/{self.name}").json()["workers"]
                except (httpx.HTTPError, ValueError, KeyError):
                    continue
                live = [w for w in ws if w.get("pid")]
                if not live:
                    continue
                w = self.rng.choice(live)
                try:
                    os.kill(w["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    continue
                self.kills += 1
                self.busy += bool(w["busy"])


def soak(a: argparse.Namespace, work: Path) -> tuple[list[list[str]], bool]:
    from flash_jupyter import Endpoint, JobFailed

    cp = ControlPlane(work).start()
    rows: list[list[str]] = []
    ok = True

    def check(name: str, good: bool, detail: str) -> None:
        nonlocal ok
        ok = ok and good
        rows.append([name, PASS if good else FAIL, detail])
        print(f"  {name}: {PASS if good else FAIL}  {detail}", flush=True)

    try:
        client = cp.use()
        events = EventCounter(cp)
        name = "soak-kills"

        @Endpoint(name=name, workers=(0, a.workers), idle_timeout=30)
        def work_item(i: int, t: float, die: bool = False) -> int:
            import os
            import signal
            import time

            if die:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(t)
            return i

        work_item.deploy()
        t0 = time.monotonic()
        killer = Killer(cp, name, a.every, a.seed)
        step = a.jobs // a.suicidal if a.suicidal else 0
        suicidal = {k * step + step // 2 for k in range(a.suicidal)}
        jobs = [work_item.submit(i, a.job_time, i in suicidal) for i in range(a.jobs)]
        killer.start()
        completed = failed_crash = wrong = 0
        odd: list[str] = []
        for i, job in enumerate(jobs):
            try:
                v = job.result(timeout=a.timeout)
            except JobFailed as e:
                msg = str(e)
                if "SIGKILL" in msg and "giving up" in msg:
                    failed_crash += 1
                else:
                    odd.append(f"job {i}: {msg[:120]}")
                continue
            except Exception as e:  # a lost job times out here
                odd.append(f"job {i}: {type(e).__name__}: {str(e)[:120]}")
                continue
            if i in suicidal:
                odd.append(f"suicidal job {i} returned {v!r} instead of failing")
            elif v == i:
                completed += 1
            else:
                wrong += 1
                odd.append(f"job {i} returned {v!r}")
        killer.done.set()
        killer.join()
        elapsed = time.monotonic() - t0
        retries = [job.info()["retries"] for job in jobs]
        health = client.health(name)["jobs"]
        wait_until(lambda: len(events.terminal) >= a.jobs or events.gaps, 10, "the last events")
        events.stop()

        check("outcome", not odd and wrong == 0,
              f"{completed} completed with their value, {failed_crash} failed with the crash "
              f"reason after the retry limit"
              + (f"; unexpected: {odd[:3]}" if odd else ""))  # fmt: skip
        lost = a.jobs - completed - failed_crash - len(odd)
        counted = health["completed"] + health["failed"]
        check("lost", lost == 0 and counted == a.jobs,
              f"{lost} lost; health: completed {health['completed']} + failed "
              f"{health['failed']} = {counted} of {a.jobs}")  # fmt: skip
        ids = {job.id for job in jobs}
        twice = [j for j in ids if events.terminal[j] > 1]
        missing = [j for j in ids if events.terminal[j] == 0]
        check("twice", not twice and (not missing or events.gaps > 0),
              f"{len(twice)} jobs with two terminal events, {len(missing)} with none "
              f"({events.gaps} events dropped by the stream)")  # fmt: skip
        own = sum(retries[i] for i in suicidal)
        check("retried", health["retried"] == sum(retries) and own == 3 * len(suicidal)
              and sum(retries) - own <= killer.kills,
              f"health retried {health['retried']} = sum of job retries {sum(retries)} = "
              f"{own} (3 x {len(suicidal)} suicidal) + {sum(retries) - own} <= kills "
              f"{killer.kills} (kills seen busy: {killer.busy})")  # fmt: skip
        check("kills", killer.kills > 0, f"{killer.kills} SIGKILLs, one every {a.every} s, "
              f"over {elapsed:.1f} s ({a.jobs / elapsed:.1f} jobs/s)")  # fmt: skip
        from flash_jupyter import client as fj_client

        fj_client.reset_client()
        cp.stop()
        good, detail, au = audit_check(cp)
        starts = sum(1 for r in au["bills"].values())
        check("billing", good and starts >= killer.kills + 3 * len(suicidal), detail)
    finally:
        from flash_jupyter import client as fj_client

        fj_client.reset_client()
        cp.stop()
    return rows, ok


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--jobs", type=int, default=60, help="jobs to run (default 60)")
    p.add_argument("--every", type=float, default=1.0, help="seconds between kills (1.0)")
    p.add_argument("--job-time", type=float, default=0.2, help="seconds each job sleeps (0.2)")
    p.add_argument("--workers", type=int, default=4, help="the endpoint's max workers (4)")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for a job (300)")
    p.add_argument(
        "--suicidal",
        type=int,
        default=2,
        help="jobs that SIGKILL their own worker every time (2; --full: 10)",
    )
    p.add_argument("--seed", type=int, default=11, help="the killer's random seed")
    p.add_argument("--work-dir", type=Path, default=None, help="where the data dir goes")
    p.add_argument("--keep", action="store_true", help="keep the data dir after a pass")
    p.add_argument("--full", action="store_true", help="the issue's run: 1,000 jobs, every 2 s")
    a = p.parse_args(argv)
    if a.full:
        a.jobs, a.every, a.suicidal = max(a.jobs, 1000), 2.0, max(a.suicidal, 10)
    if a.jobs < 1 or a.every <= 0 or a.job_time < 0 or a.workers < 1:
        p.error("--jobs and --workers must be 1 or more, --every above 0, --job-time 0 or more")
    if not 0 <= a.suicidal <= a.jobs:
        p.error("--suicidal must be between 0 and --jobs")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="soak-kills-", dir=a.work_dir))
    print(f"soak_kills: {a.jobs} jobs of {a.job_time} s on workers=(0, {a.workers}), a SIGKILL "
          f"every {a.every} s; data in {work}", flush=True)  # fmt: skip
    return run_checks(lambda: soak(a, work), work, a.keep)


if __name__ == "__main__":
    sys.exit(main())
