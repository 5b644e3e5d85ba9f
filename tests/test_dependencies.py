"""Dependency environments: built once per set of dependencies, at the first cold start,
shared by every endpoint that asks for the same set. No network: a wheel made here."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import zipfile
from pathlib import Path

import pytest
from conftest import use_server

from flash_jupyter import Endpoint, JobFailed


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def make_wheel(folder: Path) -> Path:
    """fjtinypkg 0.1, pure Python, written by hand (what `pip wheel` would make)."""
    files = {
        "fjtinypkg/__init__.py": b"VALUE = 42\n",
        "fjtinypkg-0.1.dist-info/METADATA": (
            b"Metadata-Version: 2.1\nName: fjtinypkg\nVersion: 0.1\nSummary: test package\n"
        ),
        "fjtinypkg-0.1.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: flash-jupyter-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record_path = "fjtinypkg-0.1.dist-info/RECORD"
    record = "\n".join([*(_record_line(p, d) for p, d in files.items()), f"{record_path},,"])
    wheel = folder / "fjtinypkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for p, d in files.items():
            z.writestr(p, d)
        z.writestr(record_path, record + "\n")
    return wheel


def env_dirs(data_dir: Path) -> list[Path]:
    root = data_dir / "envs"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


def test_dependencies_built_once_and_shared(own_server, monkeypatch, name, tmp_path):
    assert importlib.util.find_spec("fjtinypkg") is None  # not importable here
    wheel = make_wheel(tmp_path)
    s = own_server(PIP_NO_INDEX="1")  # no network: pip must use the wheel alone
    use_server(s, monkeypatch)

    def value():
        import fjtinypkg

        return fjtinypkg.VALUE

    first = Endpoint(name=name + "-a", dependencies=[str(wheel)], idle_timeout=5)(value)
    job = first.submit()
    assert job.result(timeout=45) == 42
    info = job.info()
    assert info["cold"] is True

    envs = env_dirs(s.data_dir)
    assert len(envs) == 1
    env = envs[0]
    ready = env / ".ready"
    assert ready.exists()
    # The cold start covers the build: venv created (pyvenv.cfg) .. installed (.ready).
    build_s = ready.stat().st_mtime - (env / "pyvenv.cfg").stat().st_mtime
    assert info["coldStartTime"] >= build_s * 1000
    built_at = (env / "pyvenv.cfg").stat().st_mtime_ns  # (.ready's own notes each use)

    second = Endpoint(name=name + "-b", dependencies=[str(wheel)], idle_timeout=5)(value)
    job2 = second.submit()
    assert job2.result(timeout=30) == 42
    assert job2.info()["cold"] is True  # a new worker ...
    assert env_dirs(s.data_dir) == [env]  # ... on the same environment, not rebuilt
    assert (env / "pyvenv.cfg").stat().st_mtime_ns == built_at
    assert importlib.util.find_spec("fjtinypkg") is None  # still not here


def test_missing_dependency_fails_the_call(own_server, monkeypatch, name, tmp_path):
    s = own_server(PIP_NO_INDEX="1")
    use_server(s, monkeypatch)
    missing = tmp_path / "no-such-package-0.1-py3-none-any.whl"

    @Endpoint(name=name, dependencies=[str(missing)], idle_timeout=5)
    def never():
        return 1

    job = never.submit()
    with pytest.raises(JobFailed) as ei:
        job.result(timeout=45)  # fails, does not hang
    msg = str(ei.value)
    assert "installing dependencies" in msg and "failed" in msg
    assert str(missing) in msg
    assert job.status() == "FAILED"
