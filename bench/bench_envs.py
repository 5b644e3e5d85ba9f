"""Dependency environments: how long one small package's environment takes to build with uv
and with pip, and whether a worker whose environment is built cold-starts as fast as one with
no dependencies.

    python bench/bench_envs.py [--runs N]

No network: the package is a tiny wheel written here, installed from its folder alone
(PIP_NO_INDEX, PIP_FIND_LINKS; uv gets pip's settings).

1. Build: ``providers.environments.prepare`` in a fresh data directory, each run from nothing
   (pip's settings read again too, as a new control plane would), with
   FLASH_JUPYTER_INSTALLER=uv and =pip. Target: under 3 s with uv.
2. Cold start: a control plane of its own; the environment is built first. Each run calls two
   new endpoints, one without dependencies and one with the package, so both need a new worker;
   ``coldStartTime`` (start signal to the worker's hello, from the job's payload) and the time
   from the call to its result (in this process). Once with spare workers off (both start a
   fresh interpreter: the environment's own cost) and once with them on (the default). Target:
   the built environment within 50 ms of no dependencies.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

PKG = "fjbenchpkg"


def make_wheel(folder: Path) -> Path:
    """A pure-Python wheel of one module, written by hand (what `pip wheel` would make)."""
    files = {
        f"{PKG}/__init__.py": b"VALUE = 42\n",
        f"{PKG}-0.1.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {PKG}\nVersion: 0.1\n".encode()
        ),
        f"{PKG}-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: bench\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }

    def row(path: str, data: bytes) -> str:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        return f"{path},sha256={digest},{len(data)}"

    record = f"{PKG}-0.1.dist-info/RECORD"
    wheel = folder / f"{PKG}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for p, d in files.items():
            z.writestr(p, d)
        z.writestr(record, "\n".join([*(row(p, d) for p, d in files.items()), f"{record},,"]))
    return wheel


def builds(runs: int, installer: str) -> list[float]:
    from flash_jupyter.providers import environments as envs

    os.environ["FLASH_JUPYTER_INSTALLER"] = installer
    times = []
    for _ in range(runs):
        home = Path(tempfile.mkdtemp(prefix="fj-bench-envs-"))
        envs._pip_settings_cache.clear()  # a new control plane reads pip's settings again
        t = time.perf_counter()
        env = envs.prepare(home, [PKG])
        times.append(time.perf_counter() - t)
        assert env.installer == installer and env.source == envs.AT_REQUEST, env
        shutil.rmtree(home)
    return times


def cold_starts(runs: int, spares: bool, wheels: Path) -> dict[str, list[float]]:
    home = tempfile.mkdtemp(prefix="fj-bench-cold-")
    os.environ.update(FLASH_JUPYTER_HOME=home, FLASH_JUPYTER_SPARE_WORKERS="1" if spares else "0",
                      FLASH_JUPYTER_INSTALLER="auto")  # fmt: skip
    os.environ.pop("FLASH_JUPYTER_URL", None)
    from flash_jupyter import Endpoint
    from flash_jupyter import client as fj_client
    from flash_jupyter.providers import environments as envs

    envs.prepare(Path(home), [PKG])  # built ahead: pre-installed
    fj_client.reset_client()
    fj_client.get_client()
    out: dict[str, list[float]] = {"none cold": [], "none call": [], "env cold": [],
                                   "env call": []}  # fmt: skip

    def value():
        return 42

    def with_pkg():
        import fjbenchpkg

        return fjbenchpkg.VALUE

    try:
        time.sleep(1.5)  # the spare (when on) is up
        for i in range(runs + 1):  # the first of each is a warm-up, left out
            order = [("none", None), ("env", [PKG])] if i % 2 else [("env", [PKG]), ("none", None)]
            for kind, deps in order:
                fn = with_pkg if deps else value
                ep = Endpoint(name=f"{kind}-{i}", dependencies=deps or (), idle_timeout=5)(fn)
                t = time.perf_counter()
                job = ep.submit()
                assert job.result(timeout=120) == 42
                call = time.perf_counter() - t
                info = job.info()
                assert info["cold"], info
                if deps:
                    assert info["environment"] == "pre-installed", info
                if i:
                    out[f"{kind} cold"].append(info["coldStartTime"] / 1000)
                    out[f"{kind} call"].append(call)
                time.sleep(1.2)  # a quiet moment: the next spare starts
    finally:
        fj_client.reset_client()
        subprocess.run([sys.executable, "-m", "flash_jupyter.cli", "shutdown"],
                       capture_output=True)  # fmt: skip
        shutil.rmtree(home, ignore_errors=True)
    return out


def ms(values: list[float]) -> str:
    return (f"median {statistics.median(values) * 1000:.0f} ms (min {min(values) * 1000:.0f}, "
            f"max {max(values) * 1000:.0f}, n={len(values)})")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    wheels = Path(tempfile.mkdtemp(prefix="fj-bench-wheels-"))
    make_wheel(wheels)
    os.environ.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels))
    from flash_jupyter.providers.environments import find_uv

    print(f"environment of one small package ({PKG}, from a local folder), built from nothing:")
    if find_uv():
        print(f"  uv:  {ms(builds(a.runs, 'uv'))}")
    else:
        print("  uv:  not installed (pip install uv)")
    print(f"  pip: {ms(builds(a.runs, 'pip'))}")
    for spares in (False, True):
        r = cold_starts(a.runs, spares, wheels)
        print(f"cold start, spare workers {'on' if spares else 'off'} "
              f"(coldStartTime; call to result):")  # fmt: skip
        for kind, label in (("none", "no dependencies      "), ("env", "built environment    ")):
            print(f"  {label} {ms(r[kind + ' cold'])}; call {ms(r[kind + ' call'])}")
        gap = statistics.median(r["env cold"]) - statistics.median(r["none cold"])
        print(f"  built environment minus none: {gap * 1000:+.0f} ms (target: within 50 ms)")
    shutil.rmtree(wheels, ignore_errors=True)


if __name__ == "__main__":
    main()
