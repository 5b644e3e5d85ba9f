"""flash-jupyter beside Ray, Dask distributed, ipyparallel and a raw socket, in one run.

Reuses the peer harness (../shared/peers: the same workload for every engine, engines
interleaved, cold starts repeated, idle memory sampled) and adds flash-jupyter as one more
engine (bench_flash.py). Prints one table with the physical limits and the issue's targets,
then two notebook figures from the same run: a `%%flash` cell that does nothing beside a plain
cell and ipyparallel's `%%px` (bench_magic.py, in the peers' venv, which has ipyparallel), and
the time from a selected `%%flash` cell to its result with the JupyterLab prewarm on and off
(bench_prewarm.py).

    ./dev bench                       # everything, 2 repetitions (about 15 minutes)
    ./dev bench --engines flash,ray --reps 1
    ./dev bench --summary-only        # re-print the latest results
    ./dev bench --no-notebook         # the engines' table only

Run by hand on a quiet machine; nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PEERS = os.environ.get("PERF_PEERS") or str(REPO.parent / "shared" / "peers")
ENGINES = ["flash", "rawsock", "ipyparallel", "dask", "ray"]
PEER_DEPS = ["ipyparallel", "dask[distributed]", "ray", "cloudpickle", "numpy", "psutil"]

# The targets (ahead of every peer).
TARGETS = {
    "cold": ("<=", 0.3, "s"),
    "p50": ("<=", 1.0, "ms"),
    "p99": ("<=", 3.0, "ms"),
    "tput": (">=", 3000, "jobs/s"),
    "send": (">=", 1500, "MB/s"),
    "recv": (">=", 1500, "MB/s"),
    "rss": ("<=", 150, "MB"),
}


def prepare(peers: str, scratch: Path, install: bool) -> Path:
    work = scratch / "perf_peers"  # run_all.py recognises its processes by this name
    work.mkdir(parents=True, exist_ok=True)
    for f in glob.glob(os.path.join(peers, "*.py")):
        shutil.copy(f, work)
    shutil.copy(REPO / "bench" / "bench_flash.py", work)
    venv = work / "venv"
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        install = True
    if not install:  # the scratch folder is shared: its flash-jupyter must be this checkout's
        where = subprocess.run(
            [str(venv / "bin" / "python"), "-c",
             "import flash_jupyter, os; print(os.path.dirname(flash_jupyter.__file__))"],
            capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        install = Path(where or "/nonexistent").resolve() != (REPO / "flash_jupyter").resolve()
    if install:
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        subprocess.run([*pip, *PEER_DEPS, "-e", f"{REPO}[fast]"], check=True)
    return work


def run(work: Path, engines: list[str], reps: int) -> None:
    code = f"import run_all\nrun_all.ENGINES = {engines!r}\nrun_all.REPS = {reps}\nrun_all.main()\n"
    subprocess.run([str(work / "venv" / "bin" / "python"), "-c", code], cwd=work, check=True)


def notebook_figures(work: Path) -> None:
    """The `%%flash` cell overhead beside `%%px`, and prewarm on/off: their RESULT lines are
    kept beside the engines' results (``results/magic_*.json``, ``results/prewarm_*.json``)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = {
        "magic": [str(work / "venv" / "bin" / "python"), str(REPO / "bench" / "bench_magic.py"),
                  "--json"],
        "prewarm": [sys.executable, str(REPO / "bench" / "bench_prewarm.py"), "--json"],
    }  # fmt: skip
    for kind, argv in runs.items():
        print(f"\n== {kind}: {' '.join(argv[1:])}", flush=True)
        r = subprocess.run(argv, capture_output=True, text=True)
        sys.stderr.write(r.stderr[-2000:])
        line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
        if r.returncode or line is None:
            print(f"{kind} failed (exit {r.returncode}):\n{r.stdout[-2000:]}")
            continue
        (work / "results" / f"{kind}_{stamp}.json").write_text(line[len("RESULT ") :])


def _latest(work: Path, kind: str) -> dict | None:
    files = sorted(glob.glob(str(work / "results" / f"{kind}_*.json")))
    return json.loads(Path(files[-1]).read_text()) if files else None


def summarize_notebook(work: Path) -> None:
    magic = _latest(work, "magic")
    if magic:
        print("\nA cell that does nothing, through a real ipykernel (bench_magic.py):\n")
        print("| cell | p50 ms | p99 ms | p50 over a plain cell ms |")
        print("|---|---|---|---|")
        label = {"plain": "plain `pass`", "flash": "`%%flash` (warm worker)",
                 "px": "`%%px` (ipyparallel, 2 engines)"}  # fmt: skip
        for v, r in magic["variants"].items():
            over = r.get("over_plain_p50_ms")
            print(f"| {label.get(v, v)} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                  f"{'-' if over is None else f'{over:.2f}'} |")  # fmt: skip
    pre = _latest(work, "prewarm")
    if pre:
        print("\nFrom Shift-Enter to the result of a new endpoint's `%%flash` cell, selected 1 s "
              "before (bench_prewarm.py, medians):\n")  # fmt: skip
        print("| scenario | prewarm off ms | prewarm on ms |")
        print("|---|---|---|")
        for sc in ("plain", "dependencies"):
            off, on = pre.get(f"{sc}_off_wait_ms"), pre.get(f"{sc}_on_wait_ms")
            if off is not None and on is not None:
                print(f"| {sc} | {off:,.0f} | {on:,.0f} |")


def _med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(work: Path) -> None:
    files = sorted(glob.glob(str(work / "results" / "run_*.json")))
    if not files:
        print("no results yet")
        return
    d = json.loads(Path(files[-1]).read_text())
    print(f"source: {files[-1]}\n")

    def warm(eng: str, key: str, sub: str | None = None) -> float | None:
        vals = [
            (r[key][sub] if sub else r[key])
            for r in d["warm"]
            if r.get("bench") == eng and key in r
        ]
        return _med(vals)

    rows = []
    engines = []
    for r in d["cold"] + d["warm"]:
        e = r.get("engine") if "engine" in r and "bench" not in r else r.get("bench")
        if e and e not in engines:
            engines.append(e)
    for e in engines:
        cold = _med(
            [r["cold_first_s"] for r in d["cold"] if r["engine"] == e and r["cold_first_s"]]
        )
        rows.append(
            {
                "engine": e,
                "cold": cold,
                "p50": warm(e, "lat_median_ms"),
                "p99": warm(e, "lat_p99_ms"),
                "tput": warm(e, "tput_tasks_s"),
                "map": warm(e, "map_tasks_s"),
                "send": warm(e, "send_MBps"),
                "recv": warm(e, "recv_MBps"),
                "rss": warm(e, "mem_idle", "peak_rss_mb"),
                "closure": next((r.get("closure") for r in d["warm"] if r.get("bench") == e), "-"),
            }
        )

    def f(v: float | None, nd: int = 2) -> str:
        return "-" if v is None else f"{v:,.{nd}f}"

    print("| engine | cold start s | round trip p50 / p99 ms | tasks/s (submit) | tasks/s (map) "
          "| 100 MB in / out MB/s | idle RSS MB | closures |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['engine']} | {f(r['cold'], 3)} | {f(r['p50'], 3)} / {f(r['p99'], 2)} | "
            f"{f(r['tput'], 0)} | {f(r['map'], 0)} | {f(r['send'], 0)} / {f(r['recv'], 0)} | "
            f"{f(r['rss'], 0)} | {r['closure']} |"
        )
    lim = d["limits"]
    if lim:

        def lm(k: str) -> str:
            return f(_med([x[k] for x in lim if k in x]), 0)

        print(
            f"\nlimits: loopback TCP {lm('tcp_loopback_MBps')} MB/s, unix socket "
            f"{lm('unix_socket_MBps')} MB/s, memcpy {lm('memcpy_prefaulted_MBps')} MB/s, "
            f"cloudpickle in-band {lm('cp5_inband_dumps_loads_MBps')} MB/s"
        )
    ours = next((r for r in rows if r["engine"] == "flash"), None)
    if ours:
        print("\nflash-jupyter against the targets:")
        for k, (op, target, unit) in TARGETS.items():
            v = ours[k]
            ok = v is not None and (v <= target if op == "<=" else v >= target)
            print(
                f"  {k:5} {f(v, 3):>10} {unit:7} target {op} {target:<6} {'ok' if ok else 'MISSED'}"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", default=DEFAULT_PEERS, help="the peer harness folder")
    p.add_argument("--scratch", default="/tmp/flash-bench", type=Path)
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--install", action="store_true", help="reinstall the peers' venv")
    p.add_argument("--summary-only", action="store_true")
    p.add_argument("--no-notebook", action="store_true",
                   help="skip the %%%%flash/%%%%px cell and prewarm figures")  # fmt: skip
    a = p.parse_args()
    work = a.scratch / "perf_peers"
    if not a.summary_only:
        if not os.path.isdir(a.peers):
            sys.exit(f"peer harness not found at {a.peers} (set --peers or PERF_PEERS)")
        work = prepare(a.peers, a.scratch, a.install)
        run(work, [e for e in a.engines.split(",") if e], a.reps)
        if not a.no_notebook:
            notebook_figures(work)
    summarize(work)
    if not a.no_notebook:
        summarize_notebook(work)


if __name__ == "__main__":
    main()
