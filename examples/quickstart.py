"""The 30-second tour: what `./dev demo` runs.

A function defined here runs on a (emulated, on this machine) A100 worker, with the
globals it uses; its prints stream back; a REST call reaches the same endpoint the way one
calls a Runpod serverless endpoint; the status table shows workers, cold starts and cost.
"""

import time

import httpx

from flash_jupyter import Endpoint
from flash_jupyter.cli import format_status
from flash_jupyter.client import get_client

SCALE = 3


def helper(x):
    return x * SCALE


@Endpoint(name="square", gpu="A100", workers=(0, 2), idle_timeout=5)
def square(x):
    print("working on", x)
    return helper(x) ** 2


def main() -> None:
    t = time.perf_counter()
    print(
        "square(4) =", square(4), f"({time.perf_counter() - t:.2f} s, control plane + cold start)"
    )
    t = time.perf_counter()
    print("square(5) =", square(5), f"({(time.perf_counter() - t) * 1000:.1f} ms, warm)")

    job = square.submit(6)
    print("job", job.id[:8], "->", job.result(timeout=30), job.info()["status"])

    t = time.perf_counter()
    results = square.map(range(20))
    print(f"map over 20 items: {len(results)} results in {time.perf_counter() - t:.2f} s")

    client = get_client()
    r = httpx.post(
        f"{client.url}/v2/square/runsync",
        headers={"Authorization": f"Bearer {client.token}"},
        json={"input": {"x": 7}},
    )
    print("POST /v2/square/runsync ->", r.json())

    print()
    print(format_status([client.endpoint("square")], client.billing()))
    print()
    print("Try: flash-jupyter status | flash-jupyter env | flash-jupyter shutdown")


if __name__ == "__main__":
    main()
