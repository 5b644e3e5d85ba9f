"""Cold start to first result of an endpoint whose function imports torch: with a preloaded
spare, without one (a fresh interpreter that imports torch in the job), and Ray's.

    python bench/bench_coldstart.py [--runs N] [--home DIR] [--ray-python PATH]

The endpoint asks for ``dependencies=["torch==2.13.0"]`` (its environment is built by pip,
from the file on these machines, the first time: minutes; ``--home`` keeps it for the next
run). Each cold start is timed in the client, from the call to its result, after the
endpoint's worker has stopped (idle_timeout) so the call needs a new worker:

- "fresh process": a control plane with FLASH_JUPYTER_SPARE_WORKERS=0;
- "preloaded spare": the default control plane, once the environment's spare reports torch
  imported (``/v1/info`` provider.spares); the job's ``spare`` field must say "preloaded".

Ray (``--ray-python``: an interpreter with ray and torch; default the peer harness's venv):
``ray.init`` done, a task with ``max_calls=1`` (each call gets a new worker process, as a
cold start does) that imports torch, timed from the call to its result.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

TORCH = "torch==2.13.0"
RAY_PYTHON = "/tmp/flash-bench/perf_peers/venv/bin/python"


def uses_torch():
    import torch

    return float(torch.ones(3).sum())


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out waiting for {what}")
        time.sleep(0.02)


def flash_cold_starts(home: str, runs: int, spares: bool) -> dict:
    """Cold starts on a control plane of its own (data dir ``home``), spares on or off."""
    env = {"FLASH_JUPYTER_HOME": home, "FLASH_JUPYTER_SPARE_WORKERS": "1" if spares else "0",
           "FLASH_JUPYTER_INSTALLER": "pip"}  # fmt: skip
    os.environ.update(env)
    os.environ.pop("FLASH_JUPYTER_URL", None)
    from flash_jupyter import Endpoint
    from flash_jupyter import client as fj_client

    fj_client.reset_client()
    c = fj_client.get_client()
    ep = Endpoint(name="torchfn", dependencies=[TORCH], idle_timeout=1)(uses_torch)
    t0 = time.perf_counter()
    job = ep.submit()
    job.result(timeout=1800)
    first = {"seconds": time.perf_counter() - t0, **_timing(job.info())}

    def gone() -> bool:
        return all(w["pid"] is None for w in c.endpoint("torchfn")["workers"])

    def spare_with_torch() -> dict | None:
        info = c._call("GET", "/v1/info")["provider"]
        for sp in info["spares"]:
            if sp["state"] == "ready" and "torch" in sp["preloaded"]:
                return sp
        return None

    times, kinds = [], []
    for _ in range(runs):
        _wait(gone, 30, "the idle worker to stop")
        if spares:
            _wait(spare_with_torch, 120, "a spare with torch imported")
        t = time.perf_counter()
        job = ep.submit()
        assert job.result(timeout=120) == 3.0
        times.append(time.perf_counter() - t)
        info = job.info()
        assert info["cold"], info
        kinds.append(info.get("spare"))
    subprocess.run([sys.executable, "-m", "flash_jupyter.cli", "shutdown"], env={**os.environ},
                   capture_output=True, timeout=60)  # fmt: skip
    fj_client.reset_client()
    return {"first": first, "times": times, "spare": kinds}


def _timing(info: dict) -> dict:
    return {k: info.get(k) for k in ("coldStartTime", "coldStartPhases", "environment", "spare")}


RAY_CODE = r"""
import json, sys, time
import ray
runs = int(sys.argv[1])
ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")

@ray.remote(max_calls=1)
def uses_torch():
    import torch
    return float(torch.ones(3).sum())

times = []
for _ in range(runs + 1):
    t = time.perf_counter()
    assert ray.get(uses_torch.remote()) == 3.0
    times.append(time.perf_counter() - t)
print(json.dumps({"first": times[0], "times": times[1:]}))
"""


def ray_cold_starts(python: str, runs: int) -> dict | str:
    if not os.path.exists(python):
        return f"no interpreter at {python}"
    check = subprocess.run([python, "-c", "import ray, torch"], capture_output=True, text=True)
    if check.returncode:
        return f"{python} lacks ray or torch: {check.stderr.strip().splitlines()[-1]}"
    out = subprocess.run([python, "-c", RAY_CODE, str(runs)], capture_output=True, text=True,
                         timeout=1200)  # fmt: skip
    if out.returncode:
        return f"ray failed: {out.stderr.strip()[-500:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def _row(name: str, times: list[float]) -> str:
    if not times:
        return f"{name:<34} (none)"
    ms = [t * 1000 for t in times]
    return (f"{name:<34} median {statistics.median(ms):8.1f} ms   min {min(ms):8.1f} ms   "
            f"max {max(ms):8.1f} ms   n={len(ms)}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--home", help="data directory to use (keeps the torch environment)")
    ap.add_argument("--ray-python", default=RAY_PYTHON)
    ap.add_argument("--no-ray", action="store_true")
    a = ap.parse_args()
    home = a.home or tempfile.mkdtemp(prefix="flash-coldstart-")
    fresh = flash_cold_starts(home, a.runs, spares=False)
    pre = flash_cold_starts(home, a.runs, spares=True)
    ray = None if a.no_ray else ray_cold_starts(a.ray_python, a.runs)
    print(f"cold start to first result, a function importing torch ({TORCH}); data dir {home}")
    print(f"first call (environment {fresh['first'].get('environment')}): "
          f"{fresh['first']['seconds']:.1f} s  {fresh['first']}")  # fmt: skip
    print(_row("flash-jupyter, fresh process", fresh["times"]), fresh["spare"])
    print(_row("flash-jupyter, preloaded spare", pre["times"]), pre["spare"])
    if isinstance(ray, dict):
        print(_row("ray (max_calls=1: new worker)", ray["times"]),
              f"first after ray.init {ray['first'] * 1000:.0f} ms")  # fmt: skip
    elif ray:
        print("ray: not measured:", ray)
    target = statistics.median(pre["times"]) if pre["times"] else float("inf")
    ok = target < 0.3 and all(k == "preloaded" for k in pre["spare"])
    print(f"target: < 300 ms with a preloaded spare: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
