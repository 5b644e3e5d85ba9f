"""`runsync` of a tiny handler through Runpod's own client, beside a plain httpx call.

The same route (`POST /v2/NAME/runsync`) on a warm endpoint, called in turns, one call at a
time, by:

    runpod   `runpod.Endpoint(NAME).run_sync({...})`: Runpod's Python package, unchanged
             (`runpod.api_key` = the token, `runpod.endpoint_url_base` = the URL + /v2); its
             requests.Session keeps the connection open
    httpx    `httpx.Client.post(URL + "/v2/NAME/runsync", json={"input": {...}})`, keep-alive

Both go through the whole path (HTTP, control plane, worker, back). Printed: p50, p99 and max
of the round trip, in ms, side by side, and the runpod client's p50 over httpx's (the issue's
target: within 1 ms). The calls alternate, so both see the same machine.

    .venv/bin/python bench/bench_runpod_client.py [--n 2000] [--warmup 200]

It starts its own control plane (a private FLASH_JUPYTER_HOME) and stops it. Run by hand;
nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="measured calls per client")
    ap.add_argument("--warmup", type=int, default=200, help="unmeasured calls per client first")
    args = ap.parse_args()

    home = tempfile.mkdtemp(prefix="flash-bench-runpod-")
    os.environ["FLASH_JUPYTER_HOME"] = home
    os.environ.pop("FLASH_JUPYTER_URL", None)
    os.environ.pop("FLASH_JUPYTER_TOKEN", None)
    import logging

    import httpx

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    import runpod  # one of its modules calls logging.basicConfig(level=INFO): undone here

    root.setLevel(level)
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)

    from flash_jupyter import Endpoint
    from flash_jupyter.client import get_client

    try:
        client = get_client()  # starts the control plane of this private data directory

        @Endpoint(name="bench-runpod", workers=(1, 1), idle_timeout=600)
        def tiny(x=0):
            return {"y": x + 1}

        tiny.deploy()
        runpod.api_key = client.token
        runpod.endpoint_url_base = client.url + "/v2"
        ep = runpod.Endpoint("bench-runpod")
        api = httpx.Client(base_url=client.url, timeout=60,
                           headers={"Authorization": f"Bearer {client.token}"})  # fmt: skip
        url = "/v2/bench-runpod/runsync"

        def via_runpod(i: int) -> None:
            assert ep.run_sync({"x": i}, timeout=60) == {"y": i + 1}

        def via_httpx(i: int) -> None:
            r = api.post(url, json={"input": {"x": i}})
            assert r.json()["output"] == {"y": i + 1}, r.text

        calls = {"runpod (runpod.Endpoint.run_sync)": via_runpod, "httpx (Client.post)": via_httpx}
        times: dict[str, list[float]] = {k: [] for k in calls}
        for i in range(args.warmup):
            for fn in calls.values():
                fn(i)
        for i in range(args.n):
            for k, fn in calls.items():
                t0 = time.perf_counter()
                fn(i)
                times[k].append((time.perf_counter() - t0) * 1000)

        print(f"runsync of a tiny handler, warm endpoint, {args.n} calls each, alternating")
        print(f"{'client':36} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'mean ms':>8}")
        for k, xs in times.items():
            print(f"{k:36} {pct(xs, 0.5):8.3f} {pct(xs, 0.99):8.3f} {max(xs):8.3f} "
                  f"{statistics.fmean(xs):8.3f}")  # fmt: skip
        rp, hx = (pct(xs, 0.5) for xs in times.values())
        print(f"runpod p50 - httpx p50: {rp - hx:+.3f} ms (target: within 1 ms)")
        api.close()
    finally:
        from flash_jupyter.client import reset_client

        reset_client()
        subprocess.run([sys.executable, "-m", "flash_jupyter.cli", "shutdown"],
                       env={**os.environ, "FLASH_JUPYTER_HOME": home})  # fmt: skip


if __name__ == "__main__":
    main()
