"""From a selected ``%%flash`` cell to its result, with the JupyterLab prewarm on and off.

A figure no peer publishes. In JupyterLab, selecting a ``%%flash`` cell posts its first line
to the Jupyter server extension (``POST /flash-jupyter/api/prewarm``), which creates the
endpoint if needed and warms one worker; the user presses Shift-Enter a moment later. This
bench plays that against a real ``jupyter server`` (the project's server extension enabled),
a real control plane and a real ipykernel:

    selected at t0 -> (prewarm on: POST /prewarm) -> think -> run the cell -> result at t1

and prints, per scenario and variant, the time from Shift-Enter to the result (what the user
waits) and from the selection to the result. Every run uses a new endpoint, so each one
starts cold; the ``dependencies`` scenario gives each run its own tiny local wheel (built
here, no network), so each one builds its environment.

    .venv/bin/python bench/bench_prewarm.py                    # --runs 5 --think 1.0
    .venv/bin/python bench/bench_prewarm.py --scenarios plain --runs 20

Run by hand on a quiet machine; nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import httpx
from jupyter_client.manager import KernelManager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_wheel(folder: Path, tag: str) -> Path:
    """A pure-Python wheel ``fjbench_<tag>`` 0.1, written by hand (what pip wheel makes)."""
    pkg = f"fjbench_{tag}"
    info = f"{pkg}-0.1.dist-info"
    files = {
        f"{pkg}/__init__.py": b"VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {pkg}\nVersion: 0.1\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: bench\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }

    def line(path: str, data: bytes) -> str:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        return f"{path},sha256={digest},{len(data)}"

    record = "\n".join([*(line(p, d) for p, d in files.items()), f"{info}/RECORD,,"]) + "\n"
    wheel = folder / f"{pkg}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for p, d in files.items():
            z.writestr(p, d)
        z.writestr(f"{info}/RECORD", record)
    return wheel


class Kernel:
    """One ipykernel, cells run one at a time until idle."""

    def __init__(self, env: dict[str, str], cwd: str):
        self.km = KernelManager(kernel_name="python3")
        self.km.kernel_spec.argv = [sys.executable, "-m", "ipykernel_launcher",
                                    "-f", "{connection_file}"]  # fmt: skip
        self.km.start_kernel(env=env, cwd=cwd)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def run(self, code: str, timeout: float = 300) -> float:
        """Run a cell; the time its result (the kernel going idle) came, or raise."""
        msg_id = self.kc.execute(code)
        error = None
        deadline = time.monotonic() + timeout
        while True:
            msg = self.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "error":
                error = "\n".join(msg["content"]["traceback"][-3:])
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                done = time.monotonic()
                break
        if error:
            raise RuntimeError(f"cell failed: {error}")
        return done

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def start_jupyter(tmp: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str, str]:
    """``jupyter server`` with the project's extension (enabled by the installed config)."""
    for d in ("config", "data", "runtime", "root"):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    port, token = free_port(), secrets.token_hex(16)
    full = {**env, "JUPYTER_CONFIG_DIR": str(tmp / "config"),
            "JUPYTER_DATA_DIR": str(tmp / "data"),
            "JUPYTER_RUNTIME_DIR": str(tmp / "runtime")}  # fmt: skip
    argv = [sys.executable, "-m", "jupyter_server", "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
            f"--ServerApp.root_dir={tmp / 'root'}", f"--IdentityProvider.token={token}",
            "--ServerApp.open_browser=False"]  # fmt: skip
    if os.geteuid() == 0:
        argv.append("--allow-root")
    log = open(tmp / "jupyter.log", "wb")  # kept open for the process
    proc = subprocess.Popen(argv, env=full, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if (
                httpx.get(f"{url}/api/status", params={"token": token}, timeout=2).status_code
                == 200
            ):
                return proc, url, token
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"jupyter server did not start: {(tmp / 'jupyter.log').read_text()[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="runs per scenario and variant (5)")
    p.add_argument("--think", type=float, default=1.0,
                   help="seconds between selecting the cell and running it (1.0)")  # fmt: skip
    p.add_argument("--scenarios", default="plain,dependencies")
    p.add_argument("--json", action="store_true", help="one RESULT line on stdout")
    a = p.parse_args(argv)
    if a.runs < 1 or a.think < 0:
        p.error("--runs must be >= 1 and --think >= 0")
    scenarios = [s for s in a.scenarios.split(",") if s]
    for s in scenarios:
        if s not in ("plain", "dependencies"):
            p.error(f"unknown scenario {s!r} (plain, dependencies)")
    scratch = Path(tempfile.mkdtemp(prefix="fj-prewarm-"))
    home = scratch / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASH_JUPYTER_")}
    env |= {"FLASH_JUPYTER_HOME": str(home), "FLASH_JUPYTER_RECEIPTS": "0",
            "PIP_NO_INDEX": "1", "IPYTHONDIR": str(scratch / "ipython")}  # fmt: skip
    cli = [sys.executable, "-m", "flash_jupyter.cli"]
    jupyter = kernel = None
    results: dict[str, dict[str, list[tuple[float, float]]]] = {}
    try:
        subprocess.run([*cli, "start"], env=env, check=True, capture_output=True, timeout=120)
        jupyter, url, token = start_jupyter(scratch / "jupyter", env)
        kernel = Kernel(env, str(scratch))
        kernel.run("%load_ext flash_jupyter")
        kernel.run("%%flash name=bench-warmup\n1")  # the kernel's client is connected
        http = httpx.Client(base_url=url, params={"token": token}, timeout=120)
        xsrf = http.get("/api/status").cookies.get("_xsrf")  # the server's XSRF rule
        headers = {"X-XSRFToken": xsrf} if xsrf else {}
        wheels = scratch / "wheels"
        wheels.mkdir()
        for scenario in scenarios:
            results[scenario] = {"on": [], "off": []}
            for i in range(a.runs):
                for variant in ("off", "on"):  # interleaved
                    name = f"bench-{scenario[:4]}-{variant}-{i}-{secrets.token_hex(2)}"
                    line = f"%%flash name={name} idle_timeout=5"
                    if scenario == "dependencies":
                        line += f" deps={make_wheel(wheels, secrets.token_hex(4))}"
                    selected = time.monotonic()
                    if variant == "on":
                        r = http.post("/flash-jupyter/api/prewarm", json={"line": line},
                                      headers=headers)  # fmt: skip
                        if r.status_code != 200 or not r.json().get("warmed"):
                            raise RuntimeError(f"prewarm: {r.status_code} {r.text[:300]}")
                    time.sleep(max(0.0, selected + a.think - time.monotonic()))
                    pressed = time.monotonic()
                    done = kernel.run(f"{line}\n1")
                    results[scenario][variant].append((done - pressed, done - selected))
                    subprocess.run([*cli, "stop", name], env=env, capture_output=True, timeout=60)
    finally:
        if kernel is not None:
            kernel.close()
        if jupyter is not None:
            jupyter.terminate()
            try:
                jupyter.wait(timeout=20)
            except subprocess.TimeoutExpired:
                jupyter.kill()
        subprocess.run([*cli, "shutdown"], env=env, capture_output=True, timeout=60)
        shutil.rmtree(scratch, ignore_errors=True)

    def med(xs: list[float]) -> float:
        return statistics.median(xs) * 1000

    print(f"\nselected -> think {a.think:g} s -> Shift-Enter -> result; medians of {a.runs} "
          f"cold runs (each a new endpoint)\n")  # fmt: skip
    print("| scenario | prewarm | Shift-Enter to result ms | selected to result ms |")
    print("|---|---|---|---|")
    summary = {}
    for scenario, by in results.items():
        for variant in ("off", "on"):
            waits = [w for w, _ in by[variant]]
            totals = [t for _, t in by[variant]]
            summary[f"{scenario}_{variant}_wait_ms"] = med(waits)
            print(f"| {scenario} | {variant} | {med(waits):,.0f} | {med(totals):,.0f} |")
    if a.json:
        print("RESULT " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
