"""Load and bounded resources, at CI size: worker logs rotate under their cap with the newest
output kept, and scripts/load.py's short run (a few hundred jobs from 8 Python clients and
over HTTP /run: all complete, none lost; flash.db, logs and the spool bounded after the
results expire). The full run (10,000 jobs) is ``python scripts/load.py --full``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import use_server, wait_for

from flash_jupyter import Endpoint
from flash_jupyter.server import store as store_mod

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "load.py"
CAP = 64 << 10  # FLASH_JUPYTER_WORKER_LOG_BYTES for the rotation test
LINES = 100_000  # ~7 MB of output: over a hundred times the cap


def _logs(data_dir: Path) -> dict[str, bytes]:
    folder = data_dir / "logs"
    out = {}
    for p in folder.iterdir() if folder.exists() else ():
        try:
            out[p.name] = p.read_bytes()
        except OSError:  # a rotation's temporary file, renamed meanwhile
            pass
    return out


def test_worker_log_rotates_under_its_cap_newest_output_kept(own_server, monkeypatch, name):
    """A worker printing ~7 MB outside any job (a thread its job started) keeps its log under
    FLASH_JUPYTER_WORKER_LOG_BYTES once it is done: NAME.log plus NAME.log.1 within the cap,
    the last line there, the first ones dropped. Without rotation the log holds all 7 MB."""
    s = own_server(FLASH_JUPYTER_WORKER_LOG_BYTES=str(CAP))
    use_server(s, monkeypatch)

    @Endpoint(name=name, workers=(0, 1), idle_timeout=60)
    def chatty(n):
        import threading

        def talk():
            for i in range(n):
                print(f"line {i:07d} " + "x" * 60, flush=i % 100 == 0)
            print(f"line {n:07d} END", flush=True)

        threading.Thread(target=talk).start()  # no job context: its output goes to the log
        return "started"

    assert chatty(LINES) == "started"

    def settled():
        logs = _logs(s.data_dir)
        written = b"".join(logs.values())
        if f"line {LINES:07d} END".encode() not in written:
            return None
        bases = {n.removesuffix(".1") for n in logs if n.endswith((".log", ".log.1"))}
        sizes = {b: len(logs.get(b, b"")) + len(logs.get(b + ".1", b"")) for b in bases}
        return (logs, sizes) if all(v <= CAP for v in sizes.values()) else None

    logs, _ = wait_for(settled, timeout=60, what="the logs to settle under the cap")
    written = b"".join(logs.values())
    assert b"line 0000000 " not in written  # the oldest output went
    assert f"line {LINES - 1:07d} ".encode() in written  # the newest stayed
    # What is kept starts at a whole line: every line in the rotated file is complete.
    for n, data in logs.items():
        if n.endswith(".log.1") and data:
            assert data.startswith(b"line "), data[:80]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_prune_gives_memory_back(tmp_path, monkeypatch):
    """After a prune (delete_jobs_before, what ControlPlane._prune calls once it has dropped
    the jobs from memory), the store's thread gives the C heap's free pages back
    (malloc_trim), TRIM_AFTER seconds later, once: without it the control plane's RSS stays
    at its peak after a burst has expired (scripts/load.py measured +17 MiB for 6,000 jobs)."""
    import asyncio

    monkeypatch.setattr(store_mod, "TRIM_AFTER", 0.0)
    store = store_mod.Store(tmp_path / "flash.db")
    assert store.sizes()["memory_trims"] == 0

    async def main() -> None:
        store.bind_loop(asyncio.get_running_loop().call_soon)
        store.delete_jobs_before(0.0)
        await asyncio.sleep(0)

    asyncio.run(main())
    try:
        wait_for(lambda: store.sizes()["memory_trims"] == 1, what="the trim after a prune")
    finally:
        store.close()
    assert store_mod.release_memory() == 1  # glibc here: malloc_trim was found and called


def run_load(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "figures.json"
    r = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--json", str(out), "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "FLASH_JUPYTER_RECEIPTS": "0"},
    )  # fmt: skip
    return r, (json.loads(out.read_text()) if out.exists() else {})


def test_load_short_run_completes_every_job_and_stays_bounded(tmp_path):
    """scripts/load.py at CI size: 300 jobs from 8 Python clients (every 25th with a 2 MiB
    array, through the spool) and 2 HTTP clients on /run: every job COMPLETED with its own
    result, none lost; after the results expire (TTL 8 s), flash.db is back within 2 MiB of
    its baseline, the spool back to its baseline, every worker log under its cap, and the
    control plane's RSS back within the script's slack."""
    r, fig = run_load(tmp_path, "--jobs", "300", "--big-every", "25")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "every check passed" in r.stdout
    py, http = fig["py"], fig["http"]
    assert (py["jobs"], http["jobs"]) == (240, 60)
    assert py["ok"] == py["jobs"] and http["ok"] == http["jobs"], (py["problems"], http["problems"])
    assert py["big"] > 0 and fig["peak"]["spool"] > fig["baseline"]["spool"]  # the spool was used
    assert fig["health"]["after_run"]["completed"] - fig["health"]["before"]["completed"] == 300
    base, after = fig["baseline"], fig["after"]
    assert after["db"] <= base["db"] + (2 << 20)
    assert after["spool"] <= base["spool"] + (8 + 4) * (2 << 20)
    assert fig["logs"]["largest"] <= fig["log_cap"]
    assert not Path(fig["data_dir"]).exists()  # the private data directory is removed


def test_load_refuses_bad_arguments(tmp_path):
    r, _ = run_load(tmp_path, "--jobs", "0")
    assert r.returncode == 2 and "--jobs must be at least 1" in r.stderr
    r, _ = run_load(tmp_path, "--http-share", "1.5")
    assert r.returncode == 2 and "--http-share must be between 0 and 1" in r.stderr
