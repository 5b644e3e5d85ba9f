"""The GPU proof (scripts/gpu_proof.py) where CI can check it, without a GPU: the refusal and
the table when there is none, its command line, and, on a host whose `nvidia-smi` is faked
(a script on PATH, as in test_gpu_placement.py), the checks that need no torch. Also the GPU
memory a worker reports in status, from a job that stands in for torch's allocator."""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import use_server, wait_for

from flash_jupyter import Endpoint

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_proof.py"
NO_GPU = "no NVIDIA GPU here (nvidia-smi not found or lists none): this proof needs one"


def load_proof():
    spec = importlib.util.spec_from_file_location("gpu_proof", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_smi(tmp_path: Path, lines: str) -> str:
    """A PATH whose nvidia-smi prints ``lines`` (what the real one prints for its query)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + "".join(f"echo '{x}'\n" for x in lines.splitlines()))
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def path_without_smi() -> str:
    dirs = os.environ["PATH"].split(os.pathsep)
    return os.pathsep.join(d for d in dirs if not (Path(d) / "nvidia-smi").exists())


def run_proof(
    path: str, *args: str, tmp: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path, **({"TMPDIR": str(tmp)} if tmp else {})}
    env.pop("FLASH_JUPYTER_URL", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)  # fmt: skip


def table_rows(stdout: str) -> dict[str, list[str]]:
    """check -> [local, ray, detail] from the printed table."""
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("| ") and not line.startswith("| check "):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.parametrize("host", ["no nvidia-smi", "nvidia-smi lists none"])
def test_without_a_gpu_it_exits_2_saying_why_with_every_check_skipped(host, tmp_path):
    path = path_without_smi() if host == "no nvidia-smi" else fake_smi(tmp_path, "")
    r = run_proof(path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [f"gpu proof: {NO_GPU}"]
    rows = table_rows(r.stdout)
    proof = load_proof()
    assert list(rows) == list(proof.CHECKS)
    assert all(cells[:2] == ["skipped", "skipped"] for cells in rows.values())
    assert r.stdout.splitlines()[0].split("|")[1:4] == [
        " check           ", " local provider ", " ray provider "]  # fmt: skip


def test_help_and_bad_arguments():
    r = run_proof(os.environ["PATH"], "--help")
    assert r.returncode == 0
    for word in ("--gpu-count", "--providers", "--ray-address", "Exit 0", "2: no NVIDIA GPU"):
        assert word in " ".join(r.stdout.split()), word
    r = run_proof(os.environ["PATH"], "--providers", "local,slurm")
    assert (
        r.returncode == 2 and "--providers takes a comma-separated list of local, ray" in r.stderr
    )


def test_the_table_lines_up_and_says_a_shared_detail_once():
    proof = load_proof()
    res = proof.Results()
    res.set("placement", "local", proof.PASS, "H100, not emulated, $0.00116/s")
    res.set("placement", "ray", proof.PASS, "H100, not emulated, $0.00116/s")
    res.set("matmul", "local", proof.PASS, "cpu 900 ms, gpu 2 ms")
    res.set("matmul", "ray", proof.FAIL, "x" * 300)
    res.skip_column("ray", "ray is not installed")  # a skipped column overrides what it had
    rows = res.rows()
    text = proof.format_table(rows)
    lines = text.splitlines()
    assert len({len(x) for x in lines}) == 1  # every line as wide as the header
    assert lines[0].startswith("| check ") and set(lines[1]) == {"|", "-"}
    by_check = {r[0]: r for r in rows}
    assert by_check["placement"][1:] == ["pass", "skipped", "local: H100, not emulated, $0.00116/s"]
    assert by_check["strict mode"][1:3] == ["skipped", "skipped"]
    assert res.notes() == ["ray provider skipped: ray is not installed"]
    assert not res.failed()
    res.set("matmul", "local", proof.FAIL, "y" * 300)
    assert res.failed()
    detail = {r[0]: r for r in res.rows()}["matmul"][3]
    assert len(detail) == proof.DETAIL_WIDTH and detail.endswith("...")
    assert "|" not in proof.format_table([["a|b", "pass", "skipped", "x"]]).splitlines()[2][2:5]


def test_on_a_gpu_host_without_torch_placement_and_strict_mode_pass(tmp_path):
    """nvidia-smi says H200; a real control plane places the worker on it (not emulated, at
    the H200's price) and strict mode refuses another type. The checks that need torch with
    CUDA fail, naming what to install, so the proof exits 1."""
    r = run_proof(fake_smi(tmp_path, "0, NVIDIA H200"), "--providers", "local", tmp=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    rows = table_rows(r.stdout)
    assert rows["placement"][:2] == ["pass", "skipped"], rows
    assert "H200, not emulated, $0.00155/s" in rows["placement"][2]
    assert rows["strict mode"][0] == "pass" and "refused" in rows["strict mode"][2]
    for check in ("visible devices", "matmul"):
        assert rows[check][0] == "FAIL" and "torch" in rows[check][2], rows[check]
    assert "ray provider skipped: not asked for (--providers)" in r.stdout
    assert f"FAILED (logs under {tmp_path}" in r.stderr  # the control plane's log is kept


def pretend_torch_holds_gpu_memory(allocated: int, reserved: int) -> str:
    """Stands in for torch on a GPU worker: a module named torch whose CUDA is initialised
    and whose allocator holds these amounts (the worker reads it after the job)."""
    import sys
    import types

    cuda = types.SimpleNamespace(
        is_initialized=lambda: True,
        device_count=lambda: 1,
        memory_allocated=lambda i=0: allocated,
        memory_reserved=lambda i=0: reserved,
    )
    sys.modules["torch"] = types.SimpleNamespace(cuda=cuda)
    return "held"


def test_the_gpu_memory_a_worker_holds_appears_in_its_view(own_server, monkeypatch):
    client = use_server(own_server(), monkeypatch)
    ep = Endpoint(name="gpu-mem", idle_timeout=30)
    assert ep(lambda: 1)() == 1
    [w] = [w for w in client.endpoint("gpu-mem")["workers"] if w["pid"]]
    assert w["gpu_memory"] is None and w["gpu_devices"] == []  # no CUDA use seen
    assert ep(pretend_torch_holds_gpu_memory)(3 << 20, 8 << 20) == "held"

    def reported():
        ws = [w for w in client.endpoint("gpu-mem")["workers"] if w["pid"]]
        return ws and ws[0]["gpu_memory"]

    mem = wait_for(reported, what="gpu_memory in the worker view")
    assert mem == {"allocated_bytes": 3 << 20, "reserved_bytes": 8 << 20, "devices": 1}
    cli = str(Path(sys.executable).parent / "flash-jupyter")
    text = subprocess.run([cli, "status", "gpu-mem"], capture_output=True, text=True,
                          timeout=60).stdout  # fmt: skip
    assert f"{w['id']} holds 3 MiB of GPU memory (8 MiB reserved by torch)" in text, text
