"""The load proof: N jobs from 8 concurrent Python clients and over HTTP /run, on one endpoint
scaled to its ``max`` workers; every job completes, none is lost, and the control plane's
resources stay bounded.

It starts a private control plane (its own data directory, a short result TTL:
``FLASH_JUPYTER_RESULT_TTL``; a worker log cap: ``FLASH_JUPYTER_WORKER_LOG_BYTES``), deploys
one endpoint (``workers=(0, W)``), warms it up, and measures the baseline. Then client
processes (8 Python ones, each its own wire connection, and 2 HTTP ones) wait at a barrier and
submit their share of the jobs as fast as they can, timing each submit (a Python ``submit()``:
pickling and sending; an HTTP ``POST /run``: answered once its job is committed), and check
every result (Python: ``Job.result()``; HTTP: ``/status`` until terminal): right value, none
missing. Every ``--big-every``-th Python job carries a 2 MiB buffer, which travels through
the shared-memory spool. Meanwhile the control plane's RSS, flash.db (+ WAL), the logs folder
and the spool folder are sampled every 0.1 s. Once every job is done, it waits for the results
to expire (the jobs' ``/status`` answers 404) and measures again.

Checks: all jobs COMPLETED with the right result, none lost or failed (clients' view and
``/v2/NAME/health``); flash.db after expiry within 2 MiB of its baseline; every worker log
under its cap; the spool back near its baseline; the control plane's RSS after expiry within
``--rss-slack-mb`` (24 MiB) of the baseline, and, with ``--rounds`` above 1 (the same load
again once the first round's results have expired), not growing from round to round (within
``--growth-mb``, 4 MiB): Python's allocator keeps a 1 MiB arena as long as any object in it
lives, so what stays above the baseline depends on the peak, not on the number of jobs run.
It prints one table (Markdown) and exits 0 when every check passed, 1 otherwise. Figures
measured on a machine shared with other work are noisy (latencies most).

Short run (CI, tests/test_load.py): ``python scripts/load.py --jobs 300``.
Full run (the issue's numbers): ``python scripts/load.py --full`` (10,000 jobs, two rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from script_kit import format_table as _format_table
from script_kit import free_port, wait_until

HEAD = ["measure", "value", "bound", "result"]
PASS, FAIL, INFO = "pass", "FAIL", ""
BIG = 2 << 20  # bytes of the buffer every --big-every-th Python job carries (spool: >= 1 MiB)
MiB = 1 << 20


def format_table(rows: list[list[str]], head: list[str] = HEAD) -> str:
    return _format_table(rows, head)


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s)) - 1))]


def mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


# ---------------------------------------------------------------- what the workers run


def big_buffer() -> Any:
    """BIG bytes that travel out-of-band, hence through the spool: a numpy array. (A
    ``bytes`` or ``bytearray`` argument is pickled in-band: it would travel inside the frame
    and be stored with the queued job in flash.db.) Without numpy: bytes, in-band."""
    try:
        import numpy
    except ImportError:
        return b"\x01" * BIG
    return numpy.ones(BIG, dtype="u1")


def work(i: int, tag: str = "", blob: Any = None) -> dict[str, Any]:
    """A tiny job: its identity back (and the size of its buffer, if it has one)."""
    return {"i": i, "tag": tag, "n": 0 if blob is None else len(blob)}


def endpoint(name: str, workers: int) -> Any:
    from flash_jupyter import Endpoint

    # The same settings from every client: the first deploy creates it, the others reuse it.
    return Endpoint(name=name, workers=(0, workers), idle_timeout=300)(work)


# ---------------------------------------------------------------- the clients


def _barrier(a: argparse.Namespace) -> None:
    Path(a.out + ".ready").touch()
    wait_until(lambda: Path(a.go).exists(), 300, "the start signal", 0.01)


def py_client(a: argparse.Namespace) -> dict[str, Any]:
    """Submit ``count`` jobs over the wire as fast as possible, then check every result."""
    fn = endpoint(a.name, a.workers)
    fn.deploy()  # connects and deploys before the clock starts
    _barrier(a)
    tag = f"py{a.index}"
    blob = big_buffer()
    jobs, lat, big = [], [], 0
    for k in range(a.count):
        i = a.first + k
        heavy = a.big_every > 0 and i % a.big_every == 0
        t = time.perf_counter()
        job = fn.submit(i, tag, blob) if heavy else fn.submit(i, tag)
        dt = time.perf_counter() - t
        if heavy:
            big += 1
        else:
            lat.append(dt)
        jobs.append((i, heavy, job))
    ok, wrong, failed = 0, [], []
    for i, heavy, job in jobs:
        try:
            got = job.result(timeout=a.timeout)
        except Exception as e:  # a failed job, or none in time: both count against the run
            failed.append(f"{job.id}: {type(e).__name__}: {e}"[:300])
            continue
        want = {"i": i, "tag": tag, "n": BIG if heavy else 0}
        if got == want:
            ok += 1
        else:
            wrong.append(f"{job.id}: {got!r} != {want!r}"[:300])
    return {
        "kind": "py",
        "count": a.count,
        "ok": ok,
        "wrong": wrong,
        "failed": failed,
        "missing": [],
        "lat": lat,
        "big": big,
        "last_id": jobs[-1][2].id if jobs else None,
    }


def http_client(a: argparse.Namespace) -> dict[str, Any]:
    """POST ``count`` jobs to /run as fast as possible, then read each one's /status until
    it is over (in submission order: the queue is FIFO)."""
    import httpx

    tag = f"http{a.index}"
    headers = {"Authorization": f"Bearer {a.token}"}
    with httpx.Client(base_url=a.url, headers=headers, timeout=a.timeout) as h:
        h.get("/v1/info").raise_for_status()
        _barrier(a)
        ids: list[tuple[str, int]] = []
        lat: list[float] = []
        refused: list[str] = []
        for k in range(a.count):
            i = a.first + k
            t = time.perf_counter()
            r = h.post(f"/v2/{a.name}/run", json={"input": {"i": i, "tag": tag}})
            lat.append(time.perf_counter() - t)
            if r.status_code != 200:
                refused.append(f"job {i}: HTTP {r.status_code} {r.text[:200]}")
                continue
            ids.append((r.json()["id"], i))
        ok, wrong, failed, missing = 0, [], [], []
        deadline = time.monotonic() + a.timeout
        pending = list(ids)
        while pending and time.monotonic() < deadline:
            jid, i = pending[0]
            r = h.get(f"/v2/{a.name}/status/{jid}")
            if r.status_code == 404:
                missing.append(jid)
                pending.pop(0)
                continue
            d = r.json()
            if d["status"] in ("IN_QUEUE", "IN_PROGRESS"):
                time.sleep(0.02)  # the ones after it are not done either
                continue
            pending.pop(0)
            want = {"i": i, "tag": tag, "n": 0}
            if d["status"] != "COMPLETED":
                failed.append(f"{jid}: {d['status']} {d.get('error')!s:.200}")
            elif d.get("output") != want:
                wrong.append(f"{jid}: {d.get('output')!r} != {want!r}"[:300])
            else:
                ok += 1
        missing += [jid for jid, _ in pending]  # never finished in time
    return {
        "kind": "http",
        "count": a.count,
        "ok": ok,
        "wrong": wrong,
        "failed": failed + refused,
        "missing": missing,
        "lat": lat,
        "big": 0,
        "last_id": ids[-1][0] if ids else None,
    }


def client_main(a: argparse.Namespace) -> int:
    res = py_client(a) if a.client == "py" else http_client(a)
    tmp = a.out + ".tmp"
    Path(tmp).write_text(json.dumps(res))
    os.replace(tmp, a.out)
    return 0


# ---------------------------------------------------------------- the control plane


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def folder_bytes(path: Path | None) -> tuple[int, int]:
    """(bytes, files) under a folder; files vanishing meanwhile are skipped."""
    total = files = 0
    if path is None:
        return 0, 0
    stack = [str(path)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    total += e.stat(follow_symlinks=False).st_size
                    files += 1
            except OSError:
                pass
    return total, files


def db_bytes(home: Path) -> int:
    n = 0
    for suffix in ("", "-wal"):
        try:
            n += (home / f"flash.db{suffix}").stat().st_size
        except OSError:
            pass
    return n


def log_sizes(home: Path) -> dict[str, int]:
    """Bytes per worker log (NAME.log and NAME.log.1 together)."""
    out: dict[str, int] = {}
    folder = home / "logs"
    for p in folder.iterdir() if folder.exists() else ():
        if p.name.endswith((".log", ".log.1")):
            try:
                base = p.name.removesuffix(".1")
                out[base] = out.get(base, 0) + p.stat().st_size
            except OSError:
                pass
    return out


class Sampler(threading.Thread):
    """The control plane's RSS and file sizes every 0.1 s; the peaks."""

    def __init__(self, pid: int, home: Path, spool: Path | None):
        super().__init__(daemon=True)
        self.pid, self.home, self.spool = pid, home, spool
        self.peak: dict[str, int] = {"rss": 0, "db": 0, "logs": 0, "spool": 0}
        self._halt = threading.Event()

    def measure(self) -> dict[str, int]:
        return {"rss": rss_bytes(self.pid), "db": db_bytes(self.home),
                "logs": folder_bytes(self.home / "logs")[0],
                "spool": folder_bytes(self.spool)[0]}  # fmt: skip

    def run(self) -> None:
        while not self._halt.wait(0.1):
            for k, v in self.measure().items():
                self.peak[k] = max(self.peak[k], v)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def start_control_plane(home: Path, a: argparse.Namespace) -> tuple[subprocess.Popen, dict]:
    ready = home / "ready.json"
    cmd = [sys.executable, "-m", "flash_jupyter.server", "--host", "127.0.0.1",
           "--port", str(free_port()), "--wire-port", str(free_port()),
           f"--token={secrets.token_urlsafe(24)}", "--data-dir", str(home),
           "--exit-with-parent", str(os.getpid()), "--ready-file", str(ready)]  # fmt: skip
    env = {**os.environ, "FLASH_JUPYTER_HOME": str(home),
           "FLASH_JUPYTER_RESULT_TTL": str(a.ttl),
           "FLASH_JUPYTER_WORKER_LOG_BYTES": str(a.log_cap)}  # fmt: skip
    env.pop("FLASH_JUPYTER_URL", None)
    env.pop("FLASH_JUPYTER_TOKEN", None)
    with open(home / "server.log", "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        wait_until(lambda: proc.poll() is not None or ready.exists(), 60, "the control plane")
    except TimeoutError:
        stop(proc)
        raise
    if proc.poll() is not None:
        tail = (home / "server.log").read_text(errors="replace").strip()[-400:]
        raise RuntimeError(f"the control plane did not start: {tail}")
    return proc, json.loads(ready.read_text())


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (it stops its workers), then SIGKILL after 15 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- the run


def spawn_clients(a: argparse.Namespace, rt: dict, work_dir: Path, go: Path, rnd: int) -> list[Any]:
    n_http = round(a.jobs * a.http_share) if a.http_clients else 0
    n_py = a.jobs - n_http
    plan = [("py", k, n_py // a.clients + (k < n_py % a.clients)) for k in range(a.clients)]
    plan += [("http", k, n_http // a.http_clients + (k < n_http % a.http_clients))
             for k in range(a.http_clients if n_http else 0)]  # fmt: skip
    env = {**os.environ, "FLASH_JUPYTER_URL": rt["url"], "FLASH_JUPYTER_TOKEN": rt["token"],
           "FLASH_JUPYTER_RECEIPTS": "0"}  # fmt: skip
    procs, first = [], {"py": 0, "http": 0}
    for kind, k, count in plan:
        out = str(work_dir / f"{kind}{k}-r{rnd}.json")
        cmd = [sys.executable, __file__, "--client", kind, "--index", str(k),
               "--first", str(first[kind]), "--count", str(count), "--name", a.name,
               "--workers", str(a.workers), "--big-every", str(a.big_every), "--out", out,
               "--go", str(go), "--url", rt["url"], "--token", rt["token"],
               "--timeout", str(a.timeout)]  # fmt: skip
        first[kind] += count
        log = open(out[: -len(".json")] + ".log", "ab")  # noqa: SIM115 (the child holds it)
        procs.append((kind, k, out, subprocess.Popen(cmd, env=env, stdout=log, stderr=log)))
        log.close()
    return procs


def run(a: argparse.Namespace) -> tuple[list[list[str]], dict[str, Any], bool]:
    import httpx

    work_dir = Path(tempfile.mkdtemp(prefix="flash-load-", dir=a.dir))
    home = work_dir / "home"
    home.mkdir(mode=0o700)
    proc, rt = start_control_plane(home, a)
    pid = int(rt.get("pid") or proc.pid)
    spool = Path(rt["spool"]) if rt.get("spool") else None
    fig: dict[str, Any] = {"jobs": a.jobs, "workers": a.workers, "clients": a.clients,
                           "http_clients": a.http_clients, "ttl_s": a.ttl, "log_cap": a.log_cap,
                           "cpus": os.cpu_count(), "data_dir": str(home)}  # fmt: skip
    clients: list[Any] = []
    try:
        os.environ["FLASH_JUPYTER_URL"], os.environ["FLASH_JUPYTER_TOKEN"] = rt["url"], rt["token"]
        os.environ["FLASH_JUPYTER_RECEIPTS"] = "0"
        h = httpx.Client(base_url=rt["url"], headers={"Authorization": f"Bearer {rt['token']}"},
                         timeout=60)  # fmt: skip
        wait_until(lambda: _ok(h, "/v1/info"), 60, "the HTTP API")
        fn = endpoint(a.name, a.workers)
        fn.deploy()
        # Warm up: every worker started, both paths (wire and HTTP) taken once.
        warm = fn.map(range(-4 * a.workers, 0))
        assert [d["i"] for d in warm] == list(range(-4 * a.workers, 0)), warm
        r = h.post(f"/v2/{a.name}/runsync", json={"input": {"i": -1, "tag": "warm"}})
        assert r.json().get("status") == "COMPLETED", r.text
        jid = h.post(f"/v2/{a.name}/run", json={"input": {"i": -2, "tag": "warm"}}).json()["id"]
        wait_until(lambda: h.get(f"/v2/{a.name}/status/{jid}").json()["status"] == "COMPLETED",
                   60, "the warm-up /run job")  # fmt: skip
        fn.submit(-3, "warm", big_buffer()).result(timeout=60)  # the spool's path too
        before = h.get(f"/v2/{a.name}/health").json()["jobs"]
        sampler = Sampler(pid, home, spool)
        time.sleep(1.0)  # let the warm-up's work settle before the baseline
        base = sampler.measure()
        fig["baseline"] = base
        sampler.start()
        results, fig["rounds"] = [], []
        for rnd in range(a.rounds):
            got, clients, one = one_round(a, rt, h, work_dir, rnd, home, base, sampler)
            results += got
            fig["rounds"].append(one)
            print(f"load: round {rnd + 1} of {a.rounds}: {json.dumps(one)}", flush=True)
        after_run = fig["rounds"][-1].pop("health")
        for one in fig["rounds"]:
            one.pop("health", None)
        sampler.stop()
        fig["peak"] = dict(sampler.peak)
        after = fig["after"] = fig["rounds"][-1]["after"]
        fig["run_s"] = round(sum(x["run_s"] for x in fig["rounds"]), 2)
        fig["expired_after_s"] = max(x["expired_after_s"] for x in fig["rounds"])
        fig["health"] = {"before": before, "after_run": after_run}
        fig["storage"] = h.get("/v1/info").json().get("storage")
        h.close()
    finally:
        for _, _, _, p in clients:
            if p.poll() is None:
                p.kill()
                p.wait()
        from flash_jupyter import client as fj_client

        fj_client.reset_client()
        stop(proc)
        logs = log_sizes(home)
        if not a.keep:  # the private data directory and its spool folder
            shutil.rmtree(work_dir, ignore_errors=True)
            if spool is not None:
                shutil.rmtree(spool, ignore_errors=True)
    return check(a, fig, results, logs, base, after)


def one_round(
    a: argparse.Namespace,
    rt: dict,
    h: Any,
    work_dir: Path,
    rnd: int,
    home: Path,
    base: dict[str, int],
    sampler: Sampler,
) -> tuple[list[dict[str, Any]], list[Any], dict[str, Any]]:
    """The clients' jobs, then the wait until their results have expired; the figures."""
    go = work_dir / f"go{rnd}"
    clients = spawn_clients(a, rt, work_dir, go, rnd)
    wait_until(lambda: all(Path(o + ".ready").exists() or p.poll() is not None
                           for _, _, o, p in clients), 120, "the clients to connect")  # fmt: skip
    t0 = time.monotonic()
    go.touch()
    for _, _, _, p in clients:
        p.wait(timeout=a.timeout + 120)
    run_s = round(time.monotonic() - t0, 2)
    results = []
    for kind, k, out, p in clients:
        try:
            results.append(json.loads(Path(out).read_text()))
        except (OSError, ValueError):
            log = Path(out[: -len(".json")] + ".log").read_text(errors="replace")[-500:]
            results.append({"kind": kind, "count": 0, "ok": 0, "wrong": [],
                            "failed": [f"client {kind}{k} exited {p.returncode}: {log}"],
                            "missing": [], "lat": [], "big": 0, "last_id": None})  # fmt: skip
    health = h.get(f"/v2/{a.name}/health").json()["jobs"]
    peak_rss = sampler.peak["rss"]
    # The results expire: every job's /status answers 404, then the files shrink back.
    last = [r["last_id"] for r in results if r["last_id"]]
    t1 = time.monotonic()
    wait_until(lambda: all(h.get(f"/v2/{a.name}/status/{j}").status_code == 404
                           for j in last), a.ttl + min(60, a.ttl) + 120,
               "the results to expire", 0.5)  # fmt: skip
    expired = round(time.monotonic() - t1, 1)
    try:  # flash.db gives the pruned pages back (incremental vacuum; WAL cut in a quiet moment)
        wait_until(lambda: db_bytes(home) <= base["db"] + 2 * MiB, 60, "flash.db to shrink", 0.2)
    except TimeoutError:
        pass  # the check says so
    time.sleep(1.0)  # a quiet second, as before the baseline
    after = sampler.measure()
    return results, clients, {"run_s": run_s, "expired_after_s": expired, "peak_rss": peak_rss,
                              "after": after, "health": health}  # fmt: skip


def _ok(h: Any, path: str) -> bool:
    try:
        return h.get(path).status_code == 200
    except Exception:
        return False


def check(
    a: argparse.Namespace,
    fig: dict[str, Any],
    results: list[dict[str, Any]],
    logs: dict[str, int],
    base: dict[str, int],
    after: dict[str, int],
) -> tuple[list[list[str]], dict[str, Any], bool]:
    rows: list[list[str]] = []
    good = True

    def row(measure: str, value: str, bound: str, ok: bool | None) -> None:
        nonlocal good
        good &= ok is not False
        rows.append([measure, value, bound, INFO if ok is None else PASS if ok else FAIL])

    for kind, label in (("py", "Python (wire)"), ("http", "HTTP /run")):
        rs = [r for r in results if r["kind"] == kind]
        if not rs:
            continue
        n = sum(r["count"] for r in rs)
        ok = sum(r["ok"] for r in rs)
        bad = [x for r in rs for x in r["wrong"] + r["failed"] + r["missing"]]
        lat = [x for r in rs for x in r["lat"]]
        p50, p99 = percentile(lat, 50) * 1000, percentile(lat, 99) * 1000
        fig[kind] = {"jobs": n, "ok": ok, "problems": bad[:10], "p50_ms": round(p50, 3),
                     "p99_ms": round(p99, 3), "max_ms": round(max(lat, default=0) * 1000, 3),
                     "big": sum(r["big"] for r in rs)}  # fmt: skip
        row(f"{label}: jobs completed, right result", f"{ok} of {n}", "all", ok == n and not bad)
        if bad:
            rows.append([f"{label}: first problem", bad[0][:100], "", FAIL])
        row(f"{label}: submit latency p50 / p99", f"{p50:.2f} / {p99:.2f} ms",
            f"{len(lat)} submits", None)  # fmt: skip
    hb, ha = fig["health"]["before"], fig["health"]["after_run"]
    done = ha["completed"] - hb["completed"]
    want = a.jobs * a.rounds
    row("health: completed (this run)", str(done), f"= {want}", done == want)
    row(
        "health: failed / in queue / retried",
        f"{ha['failed'] - hb['failed']} / {ha['inQueue']} / {ha['retried'] - hb['retried']}",
        "0 / 0 / 0",
        ha["failed"] == hb["failed"] and ha["inQueue"] == 0 and ha["retried"] == hb["retried"],
    )
    peak = fig["peak"]
    slack = a.rss_slack_mb * MiB
    row(
        "control plane RSS: baseline / peak / after expiry",
        f"{mib(base['rss'])} / {mib(peak['rss'])} / {mib(after['rss'])}",
        f"after <= baseline + {a.rss_slack_mb} MiB",
        after["rss"] <= base["rss"] + slack,
    )
    if a.rounds > 1:
        afters = [x["after"]["rss"] for x in fig["rounds"]]
        grow = a.growth_mb
        row(
            "control plane RSS after each round's expiry",
            " / ".join(mib(x) for x in afters),
            f"no growth: last <= first + {grow:g} MiB",
            afters[-1] <= afters[0] + grow * MiB,
        )
    row("flash.db + WAL: baseline / peak / after expiry",
        f"{mib(base['db'])} / {mib(peak['db'])} / {mib(after['db'])}",
        "after <= baseline + 2 MiB", after["db"] <= base["db"] + 2 * MiB)  # fmt: skip
    worst = max(logs.values(), default=0)
    row("logs folder: baseline / peak / after", f"{mib(base['logs'])} / {mib(peak['logs'])} / "
        f"{mib(after['logs'])}", f"each worker's log <= {mib(a.log_cap)} (largest "
        f"{worst / 1024:.1f} KiB, {len(logs)} logs)", worst <= a.log_cap)  # fmt: skip
    row("spool: baseline / peak / after", f"{mib(base['spool'])} / {mib(peak['spool'])} / "
        f"{mib(after['spool'])}", "after <= baseline + one buffer per client",
        after["spool"] <= base["spool"] + (a.clients + a.workers) * BIG)  # fmt: skip
    rate = a.jobs * a.rounds / fig["run_s"] if fig.get("run_s") else 0
    row("wall time (submit to last result)", f"{fig['run_s']} s ({rate:.0f} jobs/s)",
        f"{os.cpu_count()} CPUs", None)  # fmt: skip
    row("results expired after", f"{fig['expired_after_s']} s", f"TTL {a.ttl:g} s", None)
    fig["logs"] = {"largest": worst, "count": len(logs)}
    return rows, fig, good


# ---------------------------------------------------------------- the command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Load proof: N jobs from 8 Python clients and over HTTP /run on a private "
        "control plane; all complete, none lost; RSS, flash.db, logs and spool bounded after "
        "the results expire. Prints a table; exit 0 when every check passed, 1 otherwise.",
    )
    p.add_argument("--jobs", type=int, default=300, help="jobs in all (default 300)")
    p.add_argument("--full", action="store_true",
                   help="the issue's numbers: 10,000 jobs, twice (--rounds 2)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=1,
                   help="run the jobs this many times on the same control plane, each "
                   "round's results expiring before the next (1; --full: 2)")  # fmt: skip
    p.add_argument("--clients", type=int, default=8, help="Python client processes (8)")
    p.add_argument("--http-clients", type=int, default=2, help="HTTP client processes (2)")
    p.add_argument("--http-share", type=float, default=0.2,
                   help="share of the jobs sent over HTTP /run (0.2)")  # fmt: skip
    p.add_argument("--workers", type=int, default=4, help="the endpoint's max workers (4)")
    p.add_argument("--big-every", type=int, default=50,
                   help="every Nth Python job carries a 2 MiB buffer (spool); 0: none")  # fmt: skip
    p.add_argument("--ttl", type=float, default=None,
                   help="FLASH_JUPYTER_RESULT_TTL, seconds (8; --full: 30)")  # fmt: skip
    p.add_argument("--log-cap", type=int, default=1 << 20,
                   help="FLASH_JUPYTER_WORKER_LOG_BYTES (1 MiB)")  # fmt: skip
    p.add_argument(
        "--rss-slack-mb",
        type=float,
        default=24,
        help="RSS after expiry may exceed the baseline by this much (24): "
        "Python's allocator keeps a 1 MiB arena while any object in it lives",
    )
    p.add_argument(
        "--growth-mb",
        type=float,
        default=4,
        help="RSS after expiry may grow by this much from round to round (4)",
    )
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds a client waits for its results (120; --full: 900)")  # fmt: skip
    p.add_argument("--name", default="load", help="the endpoint's name")
    p.add_argument("--dir", default=None, help="where the private data directory goes")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the private data directory (and spool folder) afterwards",
    )
    # A client process (started by the run itself).
    p.add_argument("--client", choices=("py", "http"), help=argparse.SUPPRESS)
    for opt in ("--index", "--first", "--count"):
        p.add_argument(opt, type=int, default=0, help=argparse.SUPPRESS)
    for opt in ("--out", "--go", "--url", "--token"):
        p.add_argument(opt, default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.full:
        a.jobs, a.rounds = 10_000, max(a.rounds, 2)
    if a.ttl is None:
        a.ttl = 30.0 if a.full else 8.0
    if a.timeout is None:
        a.timeout = 900.0 if a.full else 120.0
    for k in ("jobs", "clients", "workers", "rounds"):
        if getattr(a, k) < 1:
            p.error(f"--{k} must be at least 1")
    if not 0 <= a.http_share <= 1:
        p.error("--http-share must be between 0 and 1")
    if a.ttl <= 0 or a.log_cap < 0 or a.http_clients < 0 or a.big_every < 0:
        p.error("--ttl must be positive; --log-cap, --http-clients, --big-every not negative")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.client:
        return client_main(a)
    print(
        f"load: {a.jobs} jobs x {a.rounds} round(s), {a.clients} Python clients + "
        f"{a.http_clients} HTTP clients "
        f"({a.http_share:.0%} over /run), endpoint workers=(0, {a.workers}), result TTL "
        f"{a.ttl:g} s, worker log cap {mib(a.log_cap)}, {os.cpu_count()} CPUs",
        flush=True,
    )
    try:
        rows, fig, good = run(a)
    except (TimeoutError, RuntimeError, AssertionError) as e:
        print(f"load: FAILED: {e}", file=sys.stderr)
        return 1
    print(format_table(rows), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(fig, indent=2))
    print("load: " + ("every check passed" if good else "some checks FAILED"), flush=True)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
