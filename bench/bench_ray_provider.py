"""The Ray provider against the local provider and against Ray itself, on one local Ray cluster.

    python bench/bench_ray_provider.py [--calls 500] [--runs 5] [--num-cpus 8]

The script starts a Ray cluster of its own (``ray.init`` in this process, in a temporary
folder; ``ray.shutdown`` stops exactly that one, never another Ray on the machine) and two
control planes of its own (``python -m flash_jupyter.server``, private data directories):
one with the local provider, one with ``FLASH_JUPYTER_PROVIDER=ray`` on that cluster.

1. Warm round trip: ``lambda x: x + 1`` on a warm endpoint, ``--calls`` sequential calls
   after a warm-up, local and Ray provider interleaved in halves. Target: Ray within 2x.
2. Cold start: placement to first result, no dependencies. Each run calls a new endpoint
   (so a new placement group, actor and worker process), timed in the client from the call
   to its result; then the endpoint is stopped and its actor confirmed gone. Beside it, in
   the same run, Ray's own: a bare actor with a method returning x + 1, timed from
   ``A.remote()`` to the first result (and the same actor inside a placement group of the
   provider's resources, which separates the placement group's share). Target: the
   provider within 1.5x of the bare actor.
3. The floor: a loopback TCP round trip (8 bytes each way, TCP_NODELAY) to another process.

The first cold start of each kind (Ray exports the class, the job's first worker) is shown
apart and not counted. For each Ray provider cold start the timeline is read from outside
the provider: the placement group's creation latency (Ray's placement group table), the
start times of the actor's process and of the worker process (``/proc``, 10 ms ticks: the
figures are +-20 ms), the control plane's cold start phases (``coldStartPhases``).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from flash_jupyter import Endpoint
from flash_jupyter import client as fj_client

SERVER = [sys.executable, "-m", "flash_jupyter.server"]  # how a control plane is started
PG_DEMAND = {"CPU": 2.0, "memory": float(4 << 30)}  # what a default (cpu3c-2-4) worker asks


def started(pid: int) -> float:
    """When a process started (epoch s), from /proc: its start tick against the uptime now
    (psutil's create_time adds the boot time, which /proc/stat rounds to a whole second)."""
    with open(f"/proc/{pid}/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        up = float(f.read().split()[0])
    return time.time() - (up - ticks / os.sysconf("SC_CLK_TCK"))


def inc(x):
    return x + 1


# ------------------------------------------------------------------ the floor: loopback TCP


def _echo(port_q) -> None:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    port_q.put(ls.getsockname()[1])
    c, _ = ls.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        b = c.recv(8)
        if not b:
            return
        c.sendall(b)


def tcp_rtt(n: int = 5000) -> list[float]:
    """Round trips of 8 bytes to an echo server in another process, after 500 of warm-up."""
    q = mp.get_context("fork").Queue()
    p = mp.get_context("fork").Process(target=_echo, args=(q,), daemon=True)
    p.start()
    s = socket.create_connection(("127.0.0.1", q.get(timeout=10)))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = []
    for i in range(n + 500):
        t = time.perf_counter()
        s.sendall(b"12345678")
        got = 0
        while got < 8:
            got += len(s.recv(8 - got))
        if i >= 500:
            out.append(time.perf_counter() - t)
    s.close()
    p.join(5)
    return out


# ------------------------------------------------------------------ control planes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ControlPlane:
    """A control plane of this script's own (a subprocess it stops by its pid)."""

    def __init__(self, root: Path, name: str, **env: str):
        self.dir = root / f"cp-{name}"
        self.dir.mkdir(parents=True)
        self.token = secrets.token_urlsafe(16)
        self.port = _free_port()
        ready = self.dir / "ready.json"
        penv = {**os.environ, **env}
        penv.pop("FLASH_JUPYTER_URL", None)
        self.log = open(self.dir / "server.log", "ab")
        self.proc = subprocess.Popen(
            [*SERVER, "--host", "127.0.0.1",
             "--port", str(self.port), "--wire-port", str(_free_port()),
             f"--token={self.token}", "--data-dir", str(self.dir),
             "--exit-with-parent", str(os.getpid()), "--ready-file", str(ready)],
            env=penv, stdout=self.log, stderr=self.log,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.dir / "server.log").read_text()[-2000:]
                raise SystemExit(f"bench: the {name} control plane did not start:\n{tail}")
            time.sleep(0.02)

    def use(self) -> fj_client.Client:
        os.environ["FLASH_JUPYTER_URL"] = f"http://127.0.0.1:{self.port}"
        os.environ["FLASH_JUPYTER_TOKEN"] = self.token
        fj_client.reset_client()
        return fj_client.get_client()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out waiting for {what}")
        time.sleep(0.01)


# ------------------------------------------------------------------ 1. warm round trip


def warm(cps: dict[str, ControlPlane], calls: int, warmup: int) -> dict[str, list[float]]:
    """``calls`` timed calls per provider, in two interleaved halves, each after a warm-up."""
    eps = {}
    times: dict[str, list[float]] = {k: [] for k in cps}
    for half in range(2):
        for kind, cp in cps.items():
            cp.use()
            f = eps.setdefault(kind, Endpoint(name="warm", workers=(0, 1), idle_timeout=600)(inc))
            for i in range(warmup):
                assert f(i) == i + 1
            n = calls // 2 if half == 0 else calls - calls // 2
            for i in range(n):
                t = time.perf_counter()
                r = f(i)
                times[kind].append(time.perf_counter() - t)
                assert r == i + 1
    for cp in cps.values():
        cp.use().stop("warm")
    return times


# ------------------------------------------------------------------ 2. cold start


@ray.remote
class Bare:
    def inc(self, x):
        return x + 1

    def pid(self):
        return os.getpid()


def bare_actor(in_pg: bool) -> dict:
    """Ray's own cold start: a new actor, timed from ``.remote()`` to its first result."""
    pg = None
    t0w = time.time()
    t = time.perf_counter()
    if in_pg:
        pg = placement_group([PG_DEMAND], strategy="STRICT_PACK")
        ray.get(pg.ready())
        strategy = PlacementGroupSchedulingStrategy(pg, 0)
        a = Bare.options(num_cpus=2, memory=PG_DEMAND["memory"], scheduling_strategy=strategy)
        a = a.remote()
    else:
        a = Bare.remote()
    assert ray.get(a.inc.remote(1)) == 2
    dt = time.perf_counter() - t
    pid = ray.get(a.pid.remote())
    # When its process started, from the call: < 0, a process Ray had started for its pool.
    proc_ms = (started(pid) - t0w) * 1000
    ray.kill(a, no_restart=True)
    if pg is not None:
        remove_placement_group(pg)
    return {"s": dt, "proc_ms": proc_ms}


def _pg_latency(name: str) -> float | None:
    """Ray's end-to-end creation latency of the placement group named ``name`` (ms)."""
    try:
        for pg in ray.util.placement_group_table().values():
            if pg.get("name") == name:
                return (pg.get("stats") or {}).get("end_to_end_creation_latency_ms")
    except Exception:
        pass
    return None


def provider_cold(c: fj_client.Client, name: str, ray_provider: bool) -> dict:
    """A new endpoint's first call, from the call to its result; the endpoint is stopped
    after, and (Ray) its actor confirmed gone."""
    f = Endpoint(name=name, workers=(0, 1), idle_timeout=600)(inc)
    f.deploy()  # registering the endpoint is not part of the cold start
    t0w = time.time()
    t = time.perf_counter()
    job = f.submit(1)
    assert job.result(timeout=120) == 2
    dt = time.perf_counter() - t
    info = job.info()
    out = {"s": dt, "phases": info.get("coldStartPhases"), "cold": info.get("cold"),
           "spare": info.get("spare")}  # fmt: skip
    [w] = c.endpoint(name)["workers"]
    if ray_provider:
        prov = c._call("GET", "/v1/info")["provider"]
        [pw] = [x for x in prov["workers"] if x["worker"] == w["id"]]
        out["pg_ms"] = _pg_latency(pw["actor"])
        try:
            worker = psutil.Process(pw["pid"])
            actor = psutil.Process(worker.ppid())
            out["actor_proc_ms"] = (started(actor.pid) - t0w) * 1000
            out["worker_proc_ms"] = (started(worker.pid) - t0w) * 1000
        except (psutil.Error, OSError):
            pass
    c.stop(name)
    if ray_provider:
        _wait(lambda: all(x["worker"] != w["id"]
                          for x in c._call("GET", "/v1/info")["provider"]["workers"]),
              60, f"the actor of {name} to be gone")  # fmt: skip
    _wait(lambda: all(x["pid"] is None for x in c.endpoint(name)["workers"]), 60,
          f"the worker of {name} to stop")  # fmt: skip
    return out


def cold(cps: dict[str, ControlPlane], runs: int) -> dict[str, list[dict]]:
    res: dict[str, list[dict]] = {"bare": [], "bare_pg": [], "ray": [], "local": [],
                                  "fresh": []}  # fmt: skip
    first = {"bare": bare_actor(False), "bare_pg": bare_actor(True),
             "ray": provider_cold(cps["ray"].use(), "cold-first", True),
             "local": provider_cold(cps["local"].use(), "cold-first", False),
             "fresh": provider_cold(cps["fresh"].use(), "cold-first", False)}  # fmt: skip
    for i in range(runs):  # interleaved, so a noisy moment hits each kind alike
        res["bare"].append(bare_actor(False))
        res["bare_pg"].append(bare_actor(True))
        res["ray"].append(provider_cold(cps["ray"].use(), f"cold-{i}", True))
        res["local"].append(provider_cold(cps["local"].use(), f"cold-{i}", False))
        res["fresh"].append(provider_cold(cps["fresh"].use(), f"cold-{i}", False))
    res["first"] = [first]
    return res


# ------------------------------------------------------------------ report


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def ms(x: float) -> str:
    return f"{x * 1000:8.2f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--num-cpus", type=int, default=8, help="the Ray node's logical CPUs")
    a = ap.parse_args()

    floor = tcp_rtt()
    root = Path(tempfile.mkdtemp(prefix="fj-bray-"))  # short: Ray's socket paths must fit
    cps: dict[str, ControlPlane] = {}
    try:
        os.environ.pop("RAY_ADDRESS", None)  # a cluster of this script's own, not "auto"
        t = time.perf_counter()
        ray.init(num_cpus=a.num_cpus, include_dashboard=False, _temp_dir=str(root / "ray"),
                 logging_level="ERROR", log_to_driver=False)  # fmt: skip
        address = ray.get_runtime_context().gcs_address
        ray_up = time.perf_counter() - t
        t = time.perf_counter()
        cps["local"] = ControlPlane(root, "local", FLASH_JUPYTER_PROVIDER="local")
        cps["ray"] = ControlPlane(root, "ray", FLASH_JUPYTER_PROVIDER="ray", RAY_ADDRESS=address)
        cp_up = time.perf_counter() - t
        w = warm(cps, a.calls, a.warmup)
        # Cold starts only: the cost of a new worker process (python -m flash_jupyter.worker).
        cps["fresh"] = ControlPlane(root, "fresh", FLASH_JUPYTER_SPARE_WORKERS="0")
        c = cold(cps, a.runs)
    finally:
        fj_client.reset_client()
        for cp in cps.values():
            cp.stop()
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)

    print(f"Ray {ray.__version__}, one node ({a.num_cpus} logical CPUs, started in "
          f"{ray_up:.1f} s), {os.cpu_count()} cores")  # fmt: skip
    print()
    print(f"Control planes: local, Ray and (cold starts only) local with "
          f"FLASH_JUPYTER_SPARE_WORKERS=0, up in {cp_up:.1f} s")  # fmt: skip
    print(f"1. warm round trip, {a.calls} sequential calls of lambda x: x + 1")
    print(f"   {'':<38}{'p50':>11}{'p99':>11}{'max':>11}")
    rows = [("loopback TCP (8 B each way)", floor), ("local provider", w["local"]),
            ("Ray provider", w["ray"])]  # fmt: skip
    for label, xs in rows:
        print(f"   {label:<38}{ms(pct(xs, 50)):>11}{ms(pct(xs, 99)):>11}{ms(max(xs)):>11}")
    print()
    print(f"2. cold start to first result, no dependencies ({a.runs} runs, interleaved)")
    print(f"   {'':<38}{'median':>11}{'min':>11}{'max':>11}   first")
    labels = {
        "bare": "Ray: bare actor",
        "bare_pg": "Ray: bare actor in a placement group",
        "ray": "Ray provider (new endpoint)",
        "local": "local provider (new endpoint)",
        "fresh": "local provider, no spare (new process)",
    }
    for k, label in labels.items():
        xs = [r["s"] for r in c[k]]
        print(f"   {label:<38}{ms(statistics.median(xs)):>11}{ms(min(xs)):>11}"
              f"{ms(max(xs)):>11}   {ms(c['first'][0][k]['s'])}")  # fmt: skip
    for k in ("bare", "bare_pg"):
        print(f"   {labels[k]}: its process started (ms after the call; < 0: Ray's pool):",
              " ".join(f"{r['proc_ms']:.0f}" for r in c[k]))  # fmt: skip
    print("   local provider adopted a spare:", [r["spare"] for r in c["local"]])
    print("   Ray provider timeline per run (ms after the call; pg: Ray's creation latency):")
    for r in c["ray"]:
        ph = r.get("phases") or {}
        print(f"     pg {r.get('pg_ms') or 0:6.1f}  actor process {r.get('actor_proc_ms', 0):7.1f}"
              f"  worker process {r.get('worker_proc_ms', 0):7.1f}  result {r['s'] * 1000:7.1f}"
              f"  | phases: process {ph.get('process')} code {ph.get('code')}")  # fmt: skip
    print()
    w_ratio = pct(w["ray"], 50) / pct(w["local"], 50)
    w99 = pct(w["ray"], 99) / pct(w["local"], 99)
    c_ratio = statistics.median(r["s"] for r in c["ray"]) / statistics.median(
        r["s"] for r in c["bare"]
    )
    print(f"   {'target':<52}{'measured':>20}   result")
    print(f"   {'warm round trip p50: Ray provider <= 2x local':<52}{w_ratio:>19.2f}x   "
          f"{'ok' if w_ratio <= 2 else 'MISSED'}")  # fmt: skip
    print(f"   {'warm round trip p99: Ray provider <= 2x local':<52}{w99:>19.2f}x   "
          f"{'ok' if w99 <= 2 else 'MISSED'}")  # fmt: skip
    print(f"   {'cold start: Ray provider <= 1.5x Ray bare actor':<52}{c_ratio:>19.2f}x   "
          f"{'ok' if c_ratio <= 1.5 else 'MISSED'}")  # fmt: skip
    print(f"   {'(floor: loopback TCP round trip p50)':<52}{pct(floor, 50) * 1e6:>17.1f} us")


if __name__ == "__main__":
    main()
