"""The GPU proof: on a machine with an NVIDIA GPU, show the GPU promise holds end to end.

For each provider (the local one, and Ray on this one node) it starts a private control plane
in strict GPU mode (``FLASH_JUPYTER_STRICT_GPU=1``) and checks, with real workers and torch:

  placement        an endpoint asking for this host's GPU type gets it: the hardware label is
                   that type, not emulated, and the job's pricePerSecond is its catalogue price
  visible devices  CUDA_VISIBLE_DEVICES in the worker is what it was given, and torch sees
                   exactly gpu_count devices of that type
  matmul           an n x n matmul on the GPU is right and faster than on the CPU (both timed)
  gpu memory       the worker view in status reports the GPU memory the worker holds
  strict mode      an endpoint asking for a GPU type the host lacks (with Ray: that no node
                   of the cluster has) is refused, naming the type

It prints one summary table (check | local provider | ray provider | detail) and exits 0 when
every check that ran passed, 1 on any failure, 2 when there is no NVIDIA GPU here (every check
"skipped"). ``./dev gpu`` installs torch first (TORCH_SPEC) and runs it. The Ray column is
skipped, saying why, when ray or the Ray provider is not installed.

It lives in scripts/ rather than bench/: it is a pass/fail check for a person with a GPU, not
a timing comparison, and CI runs only its no-GPU path (tests/test_gpu_proof.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

NO_GPU = "no NVIDIA GPU here (nvidia-smi not found or lists none): this proof needs one"
CHECKS = ("placement", "visible devices", "matmul", "gpu memory", "strict mode")
PROVIDERS = ("local", "ray")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from script_kit import format_table as _format_table  # noqa: E402
from script_kit import free_port, wait_until  # noqa: E402

HEAD = ["check", "local provider", "ray provider", "detail"]
PASS, FAIL, SKIP = "pass", "FAIL", "skipped"
DETAIL_WIDTH = 110  # the table's last column; each check's full detail is printed as it ends


class Results:
    """Each check's outcome per provider: (state, detail)."""

    def __init__(self) -> None:
        self.cells: dict[tuple[str, str], tuple[str, str]] = {}
        self.columns_skipped: dict[str, str] = {}  # provider -> why (said once, below)

    def set(self, check: str, provider: str, state: str, detail: str = "") -> None:
        self.cells[(check, provider)] = (state, detail)
        if state != SKIP:
            print(f"  {provider} / {check}: {state}  {detail}", flush=True)

    def skip_column(self, provider: str, why: str) -> None:
        self.columns_skipped[provider] = why
        for check in CHECKS:
            self.cells[(check, provider)] = (SKIP, "")

    def notes(self) -> list[str]:
        return [f"{p} provider skipped: {why}" for p, why in self.columns_skipped.items()]

    def skip_all(self, provider: str, why: str) -> None:
        for check in CHECKS:
            if (check, provider) not in self.cells:
                self.set(check, provider, SKIP, why)

    def state(self, check: str, provider: str) -> str:
        return self.cells.get((check, provider), (SKIP, ""))[0]

    def failed(self) -> bool:
        return any(state == FAIL for state, _ in self.cells.values())

    def rows(self) -> list[list[str]]:
        rows = []
        for check in CHECKS:
            details = []
            for p in PROVIDERS:
                d = self.cells.get((check, p), (SKIP, ""))[1]
                if d and all(d != other for _, other in details):
                    details.append((p, d))
            if len(details) == 1 and len({self.state(check, p) for p in PROVIDERS}) == 1:
                detail = details[0][1]  # the same for both columns: said once
            else:
                detail = "; ".join(f"{p}: {d}" for p, d in details)
            if len(detail) > DETAIL_WIDTH:
                detail = detail[: DETAIL_WIDTH - 3] + "..."
            rows.append([check, *(self.state(check, p) for p in PROVIDERS), detail])
        return rows


def format_table(rows: list[list[str]], head: list[str] = HEAD) -> str:
    return _format_table(rows, head)


def host_gpus() -> list[tuple[int, str, Any]]:
    """(index, nvidia-smi name, catalogue type) per GPU: the local provider's own detection."""
    from flash_jupyter.providers.local import detect_gpus

    return detect_gpus()


def torch_report(python: str) -> tuple[bool, str]:
    """Whether torch with CUDA works in ``python``, asked in a child so this process holds
    no CUDA context: (ok, what to say)."""
    code = ("import json, torch; print(json.dumps([torch.__version__, torch.version.cuda, "
            "torch.cuda.is_available()]))")  # fmt: skip
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        if "No module named 'torch'" in last:
            return False, "torch is not installed here; ./dev gpu installs it (TORCH_SPEC)"
        return False, f"torch does not import ({last[:80]}); ./dev gpu installs it"
    version, cuda, available = json.loads(r.stdout.strip().splitlines()[-1])
    if cuda is None:
        return False, (f"torch {version} is a CPU build: install a CUDA build, e.g. "
                       "TORCH_SPEC='torch --index-url https://download.pytorch.org/whl/cu128' "
                       "./dev gpu")  # fmt: skip
    if not available:
        return False, f"torch {version} (CUDA {cuda}) sees no GPU: check the driver (nvidia-smi)"
    return True, f"torch {version}, CUDA {cuda}"


def ray_missing() -> str | None:
    """Why the Ray column cannot run, or None."""
    if importlib.util.find_spec("ray") is None:
        return "ray is not installed (pip install 'ray[default]')"
    if importlib.util.find_spec("flash_jupyter.providers.ray_provider") is None:
        return "the Ray provider (flash_jupyter/providers/ray_provider.py) is not there yet"
    return None


def stop_group(proc: subprocess.Popen, grace: float = 10) -> None:
    """End a process this script started in its own session, and its children."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def ray_head(work: Path, timeout: float = 90) -> Iterator[str]:
    """A one-node Ray cluster of this machine (``ray start --head --block``), private to this
    run: its own temp dir and port; ended with its process group (never ``ray stop``, which
    stops every Ray on the machine). Yields its address."""
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if ray is None:
        raise RuntimeError("the ray command is not on PATH")
    tmp = Path(tempfile.mkdtemp(prefix="fj-ray-"))  # short: Ray's socket paths must fit
    port = free_port()
    log = work / "ray-head.log"
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [ray, "start", "--head", "--block", f"--port={port}", f"--temp-dir={tmp}",
             "--include-dashboard=false", "--disable-usage-stats"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_until(lambda: proc.poll() is not None or "block forever" in log.read_text(),
                   timeout, "Ray head")  # fmt: skip
        if proc.poll() is not None:
            raise RuntimeError(f"ray start failed: {log.read_text()[-300:]}")
        yield f"127.0.0.1:{port}"
    finally:
        stop_group(proc)
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def control_plane(
    work: Path, provider: str, ray_address: str | None, timeout: float = 60
) -> Iterator[Any]:
    """A private control plane (own FLASH_JUPYTER_HOME, strict GPU mode) and a client of it."""
    from flash_jupyter import client as fj_client

    home = Path(tempfile.mkdtemp(prefix=f"cp-{provider}-", dir=work))
    ready = home / "ready.json"
    cmd = [sys.executable, "-m", "flash_jupyter.server", "--host", "127.0.0.1",
           "--port", str(free_port()), "--wire-port", str(free_port()),
           f"--token={secrets.token_urlsafe(24)}", "--data-dir", str(home),
           "--exit-with-parent", str(os.getpid()), "--ready-file", str(ready)]  # fmt: skip
    if provider == "ray":
        cmd += ["--provider", "ray", "--ray-address", ray_address or "auto"]
    env = {**os.environ, "FLASH_JUPYTER_HOME": str(home), "FLASH_JUPYTER_STRICT_GPU": "1"}
    env.pop("FLASH_JUPYTER_URL", None)
    log = home / "server.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        wait_until(lambda: proc.poll() is not None or ready.exists(), timeout, "control plane")
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["?"]
            raise RuntimeError(f"the {provider} control plane did not start: {tail[0][:200]}")
        runtime = json.loads(ready.read_text())
        os.environ["FLASH_JUPYTER_URL"] = runtime["url"]
        os.environ["FLASH_JUPYTER_TOKEN"] = runtime["token"]
        fj_client.reset_client()
        c = fj_client.get_client()
        wait_until(lambda: _pings(c), timeout, "HTTP API")
        yield c
    finally:
        fj_client.reset_client()
        stop_group(proc)


def _pings(c: Any) -> bool:
    try:
        c._call("GET", "/v1/info")
        return True
    except Exception:
        return False


# ---------------------------------------------------------------- what runs on the worker


def probe_devices() -> dict[str, Any]:
    """What this worker process was given and what torch sees."""
    import os
    import sys

    import torch

    n = torch.cuda.device_count()
    got: dict[str, Any] = {
        "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "count": n,
        "names": [torch.cuda.get_device_name(i) for i in range(n)],
    }
    ray = sys.modules.get("ray")  # a Ray actor: the GPUs Ray assigned it
    if ray is not None and ray.is_initialized():
        got["ray_gpu_ids"] = [str(i) for i in ray.get_gpu_ids()]
    return got


def matmul_times(n: int, cpu_reps: int, gpu_reps: int) -> dict[str, Any]:
    """Seconds per n x n float32 matmul on the CPU and on the GPU; the GPU operands stay
    allocated afterwards (so status has GPU memory to report)."""
    import sys
    import time

    import torch

    torch.manual_seed(0)
    a, b = torch.randn(n, n), torch.randn(n, n)
    want = a @ b  # also warms the CPU kernels
    t = time.perf_counter()
    for _ in range(cpu_reps):
        a @ b
    cpu = (time.perf_counter() - t) / cpu_reps
    ga, gb = a.cuda(), b.cuda()
    got = ga @ gb  # warm-up: cuBLAS handles, kernel choice
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(gpu_reps):
        ga @ gb
    torch.cuda.synchronize()
    gpu = (time.perf_counter() - t) / gpu_reps
    err = float((got.cpu() - want).abs().max() / want.abs().max())
    sys._flash_gpu_proof = (ga, gb)  # type: ignore[attr-defined]  # kept on the GPU
    return {"cpu_s": cpu, "gpu_s": gpu, "rel_err": err, "held": 2 * n * n * 4}


def nothing() -> None:
    return None


# ---------------------------------------------------------------- the checks


def pick_type(gpus: list[tuple[int, str, Any]], count: int) -> tuple[Any, list[int]] | str:
    """The catalogue type to ask for (the first on the host with ``count`` GPUs) and its
    indices, or why there is none."""
    by_type: dict[str, list[int]] = {}
    types = {}
    for idx, _, hw in gpus:
        if hw is not None:
            by_type.setdefault(hw.name, []).append(idx)
            types[hw.name] = hw
    for name, idxs in by_type.items():
        if len(idxs) >= count:
            return types[name], sorted(idxs)
    names = ", ".join(sorted({n for _, n, _ in gpus}))
    if not by_type:
        return (f"no GPU here is in flash-jupyter's catalogue ({names}): add its nvidia-smi "
                "name to flash_jupyter/catalog.py")  # fmt: skip
    return f"no catalogue type has {count} GPUs here ({names}): use --gpu-count 1"


def lacking_type(gpus: list[tuple[int, str, Any]]) -> str:
    from flash_jupyter import catalog

    have = {hw.name for _, _, hw in gpus if hw is not None}
    return next(hw.name for hw in catalog.GPUS if hw.name not in have)


def run_provider(
    provider: str,
    results: Results,
    c: Any,
    hw: Any,
    indices: list[int],
    gpus: list[tuple[int, str, Any]],
    a: argparse.Namespace,
    torch_ok: tuple[bool, str],
) -> None:
    """All checks against one control plane; each records its own outcome."""
    from flash_jupyter import Endpoint, catalog

    n = a.gpu_count
    label = hw.name + (f" x{n}" if n > 1 else "")
    name = f"gpu-proof-{provider}"
    settings = {"gpu": hw.name, "gpu_count": n, "idle_timeout": 60, "execution_timeout": 300}

    def record(check: str, fn: Callable[[], str]) -> None:
        try:
            results.set(check, provider, PASS, fn())
        except Exception as e:  # a failed check says why and the next one still runs
            results.set(check, provider, FAIL, f"{type(e).__name__}: {e}"[:160])

    def placement() -> str:
        job = Endpoint(name=f"{name}-place", **settings)(nothing).submit()
        job.result(timeout=a.timeout)
        info = job.info()
        price = catalog.lookup(hw.name, "gpu").price_per_second * n
        workers = [w for w in c.endpoint(f"{name}-place")["workers"] if w["pid"]]
        problems = []
        if info.get("hardwareLabel") != label:
            problems.append(f"job ran on {info.get('hardwareLabel')!r}, not {label!r}")
        if abs((info.get("pricePerSecond") or 0) - price) > 1e-12:
            problems.append(f"pricePerSecond {info.get('pricePerSecond')} != {price:g}")
        if not workers or any(w["emulated"] or w["hardware"] != label for w in workers):
            problems.append(f"worker views: {[(w['hardware'], w['emulated']) for w in workers]}")
        if problems:
            raise AssertionError("; ".join(problems))
        return f"{label}, not emulated, ${price:g}/s"

    ep = Endpoint(name=name, **settings)

    def visible() -> str:
        if not torch_ok[0]:
            raise RuntimeError(torch_ok[1])
        got = ep(probe_devices)()
        cvd = (got["cvd"] or "").split(",") if got["cvd"] else []
        live = [w for w in c.endpoint(name)["workers"] if w["pid"]]
        given = [str(i) for i in (live[0].get("gpu_devices") or [] if live else [])]
        if not given and "ray_gpu_ids" in got:
            given, source = got["ray_gpu_ids"], "ray.get_gpu_ids()"
        else:
            source = "its allocation"
        problems = []
        if not given:
            problems.append(f"the worker view's gpu_devices is empty: the {provider} provider "
                            "does not record the GPUs it gave (Allocation.devices)")  # fmt: skip
        elif cvd != given:
            problems.append(f"CUDA_VISIBLE_DEVICES={got['cvd']!r} but {source} is {given}")
        if provider == "local" and given != [str(i) for i in indices[:n]]:
            problems.append(f"given {given}, the host's first free {hw.name}s are {indices[:n]}")
        if got["count"] != n or len(cvd) != n:
            problems.append(f"torch sees {got['count']} devices, asked for {n}")
        wrong = [
            x for x in got["names"] if getattr(catalog.match_smi_name(x), "name", 0) != hw.name
        ]
        if wrong:
            problems.append(f"torch's devices {wrong} are not {hw.name}")
        if problems:
            raise AssertionError("; ".join(problems))
        return f"CUDA_VISIBLE_DEVICES={got['cvd']} ({source}), torch sees {got['names'][0]}"

    mm: dict[str, Any] = {}

    def matmul() -> str:
        if not torch_ok[0]:
            raise RuntimeError(torch_ok[1])
        mm.update(ep(matmul_times)(a.size, a.cpu_reps, a.gpu_reps))
        times = f"{a.size}x{a.size}: cpu {mm['cpu_s'] * 1e3:.1f} ms, gpu {mm['gpu_s'] * 1e3:.2f} ms"
        if mm["rel_err"] > 1e-2:
            raise AssertionError(
                f"GPU result differs from the CPU's (rel. error {mm['rel_err']:.2g})"
            )
        if not mm["gpu_s"] < mm["cpu_s"]:
            raise AssertionError(f"the GPU is not faster: {times}")
        return f"{times} ({mm['cpu_s'] / mm['gpu_s']:.0f}x)"

    def memory() -> str:
        if not mm:
            raise RuntimeError("needs the matmul check's worker")

        def reported() -> dict[str, int] | None:
            for w in c.endpoint(name)["workers"]:
                mem = w.get("gpu_memory")
                if w["pid"] and mem and mem.get("allocated_bytes", 0) >= mm["held"]:
                    return mem
            return None

        try:
            mem = wait_until(reported, 10, "GPU memory in the worker view")
        except TimeoutError:
            views = [
                w.get("gpu_memory", "no gpu_memory field") for w in c.endpoint(name)["workers"]
            ]
            raise AssertionError(
                f"worker views report {views}, want >= {mm['held']} bytes"
            ) from None
        mib = 1 << 20
        return (f"worker view: {mem['allocated_bytes'] / mib:.0f} MiB allocated, "
                f"{mem['reserved_bytes'] / mib:.0f} MiB reserved")  # fmt: skip

    def strict() -> str:
        from flash_jupyter.errors import FlashError

        other = lacking_type(gpus)
        ep_name = f"{name}-strict"
        try:
            job = Endpoint(name=ep_name, gpu=other, idle_timeout=5)(nothing).submit()
            job.result(timeout=a.strict_timeout)
        except FlashError as e:
            if other.lower() not in str(e).lower():
                raise AssertionError(f"refused, but not naming {other}: {e}") from None
            return f"{other} refused ({type(e).__name__}): {str(e).splitlines()[0]}"
        except TimeoutError:
            states = [w["state"] for w in c.endpoint(f"{name}-strict")["workers"]]
            raise AssertionError(f"{other} neither refused nor run in {a.strict_timeout} s "
                                 f"(workers: {states})") from None  # fmt: skip
        raise AssertionError(f"{other} ran on a host without one")

    record("placement", placement)
    record("visible devices", visible)
    record("matmul", matmul)
    record("gpu memory", memory)
    record("strict mode", strict)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gpu_proof.py",
        description="Prove the GPU promise on this machine's NVIDIA GPU, with the local "
        "provider and with Ray on this one node; print one summary table. Exit 0: every "
        "check that ran passed; 1: a check failed; 2: no NVIDIA GPU here.",
    )
    p.add_argument("--gpu-count", type=int, default=1, help="GPUs per worker (default 1)")
    p.add_argument("--providers", default="local,ray", help="which columns to run (local,ray)")
    p.add_argument("--ray-address", help="use this Ray cluster instead of starting one here")
    p.add_argument("--size", type=int, default=4096, help="matmul size n (default 4096)")
    p.add_argument("--cpu-reps", type=int, default=2)
    p.add_argument("--gpu-reps", type=int, default=20)
    p.add_argument("--timeout", type=float, default=120, help="seconds for a worker's first job")
    p.add_argument("--strict-timeout", type=float, default=20,
                   help="seconds strict mode has to refuse a missing GPU type")  # fmt: skip
    a = p.parse_args(argv)
    wanted = [x.strip() for x in a.providers.split(",") if x.strip()]
    if not wanted or any(x not in PROVIDERS for x in wanted):
        p.error(f"--providers takes a comma-separated list of {', '.join(PROVIDERS)}")
    if a.gpu_count < 1:
        p.error("--gpu-count must be at least 1")
    a.providers = wanted
    return a


def report(results: Results, why: str | None = None) -> None:
    print(format_table(results.rows()), flush=True)
    for line in results.notes():
        print(line, flush=True)
    if why:
        print(f"gpu proof: {why}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    results = Results()
    gpus = host_gpus()
    if not gpus:
        for p in PROVIDERS:
            results.skip_all(p, "no NVIDIA GPU")
        report(results, NO_GPU)
        return 2
    picked = pick_type(gpus, a.gpu_count)
    if isinstance(picked, str):
        for check in CHECKS:
            for p in PROVIDERS:
                results.set(check, p, FAIL if p in a.providers else SKIP, picked)
        report(results, picked)
        return 1
    hw, indices = picked
    print(f"gpu proof: {len(gpus)} GPU(s) here, asking for {a.gpu_count} x {hw.name} "
          f"({next(n for i, n, _ in gpus if i == indices[0])})", flush=True)  # fmt: skip
    torch_ok = torch_report(sys.executable)
    print(f"gpu proof: {torch_ok[1]}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="flash-gpu-proof-"))
    t0 = time.monotonic()
    for provider in PROVIDERS:
        if provider not in a.providers:
            results.skip_column(provider, "not asked for (--providers)")
            continue
        why = ray_missing() if provider == "ray" else None
        if why:
            results.skip_column(provider, why)
            continue
        print(f"gpu proof: {provider} provider ...", flush=True)
        try:
            if provider == "ray" and not a.ray_address:
                with ray_head(work) as address, control_plane(work, provider, address) as c:
                    run_provider(provider, results, c, hw, indices, gpus, a, torch_ok)
            else:
                with control_plane(work, provider, a.ray_address) as c:
                    run_provider(provider, results, c, hw, indices, gpus, a, torch_ok)
        except Exception as e:  # the control plane or Ray did not start: every check fails
            for check in CHECKS:
                if results.state(check, provider) == SKIP:
                    results.set(check, provider, FAIL, f"{type(e).__name__}: {e}"[:160])
    failed = results.failed()
    report(results, f"FAILED (logs under {work})" if failed else None)
    if not failed:
        print(f"gpu proof: passed in {time.monotonic() - t0:.0f} s", flush=True)
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
