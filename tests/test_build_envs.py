"""`flash-jupyter build` and `flash-jupyter envs`, and what a cold start says about its
environment. No network: the one package is a wheel made here (test_dependencies.make_wheel),
installed by pip or uv from that folder alone (PIP_NO_INDEX, PIP_FIND_LINKS; uv is given
pip's settings)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import use_server, wait_for

from flash_jupyter import Endpoint
from flash_jupyter.app.build import registered_endpoints
from flash_jupyter.jupyter import receipts
from flash_jupyter.providers import environments as envs

CLI = str(Path(sys.executable).parent / "flash-jupyter")
NO_UV = envs.find_uv() is None
INSTALLERS = [
    pytest.param("pip"),
    pytest.param("uv", marks=pytest.mark.skipif(NO_UV, reason="uv is not installed")),
]


def offline(wheels: Path, home: Path, installer: str = "auto") -> dict[str, str]:
    """The variables that make a build use the wheel folder alone, in ``home``."""
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels), "FLASH_JUPYTER_HOME": str(home),
            "FLASH_JUPYTER_INSTALLER": installer}  # fmt: skip


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    e = {**os.environ, **env}
    e.pop("FLASH_JUPYTER_URL", None)
    return subprocess.run([CLI, *args], env=e, capture_output=True, text=True, timeout=180)


def write_app(folder: Path, text: str) -> Path:
    app = folder / "app.py"
    app.write_text("from flash_jupyter import Endpoint\n\n" + textwrap.dedent(text))
    return app


def env_dirs(home: Path) -> list[str]:
    root = home / "envs"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []


@pytest.mark.parametrize("installer", INSTALLERS)
def test_build_once_then_cached_and_shared(tmp_path, wheels, installer):
    home = tmp_path / "home"
    app = write_app(tmp_path, """\
        @Endpoint(dependencies=["fjtinypkg"])
        def a(): pass

        @Endpoint(dependencies=["fjtinypkg"], workers=2)
        def b(): pass

        @Endpoint(dependencies=["numpy", "fjtinypkg"])  # numpy: the control plane's own
        def c(): pass

        @Endpoint()
        def d(): pass
        """)  # fmt: skip
    env = offline(wheels, home, installer)
    r = cli("build", str(app), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    built = rf"built in [\d.]+ s with {installer}"
    m = re.fullmatch(rf"a: environment (py\d+-\w+) \(fjtinypkg\) {built}", lines[0])
    assert m, lines
    key_a = m.group(1)
    assert lines[1] == f"b: environment {key_a} (fjtinypkg) cached; shared with a"
    m = re.fullmatch(rf"c: environment (py\d+-\w+) \(fjtinypkg, numpy\) built in [\d.]+ s with "
                     rf"{installer}", lines[2])  # fmt: skip
    assert m, lines
    key_c = m.group(1)
    assert lines[3] == "d: none: the control plane's own environment"
    assert lines[4].startswith("4 endpoints, 2 environments (2 built) in ")
    assert env_dirs(home) == sorted([key_a, key_c])  # no temporary folder left either

    # The package is in the environment; numpy is the control plane's, not installed again.
    python = home / "envs" / key_c / "bin" / "python"
    out = subprocess.run([str(python), "-c", "import fjtinypkg, numpy; "
                          "print(fjtinypkg.__file__); print(numpy.__file__)"],
                         capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert out[0].startswith(str(home / "envs" / key_c))
    assert not out[1].startswith(str(home)), out
    site = next((home / "envs" / key_c).glob("lib/python*/site-packages"))
    assert not [p.name for p in site.iterdir() if p.name.lower().startswith("numpy")]
    record = json.loads((home / "envs" / key_c / ".ready").read_text())
    assert record["requirements"] == ["fjtinypkg", "numpy"] and record["installer"] == installer
    assert record["size"] > 0 and record["built_for"] == ["c"]

    # Again: every environment is found, none is rebuilt.
    made = (home / "envs" / key_a / "pyvenv.cfg").stat().st_mtime_ns
    r = cli("build", str(app), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[:4] == [
        f"a: environment {key_a} (fjtinypkg) cached",
        f"b: environment {key_a} (fjtinypkg) cached; shared with a",
        f"c: environment {key_c} (fjtinypkg, numpy) cached",
        "d: none: the control plane's own environment",
    ]
    assert "(0 built)" in r.stdout.splitlines()[4]
    assert (home / "envs" / key_a / "pyvenv.cfg").stat().st_mtime_ns == made


@pytest.mark.parametrize("installer", [*INSTALLERS, pytest.param("auto", marks=pytest.mark.skipif(
    NO_UV, reason="auto is pip without uv: the pip case"))])  # fmt: skip
def test_a_failed_install_leaves_nothing(tmp_path, wheels, installer):
    home = tmp_path / "home"
    app = write_app(
        tmp_path,
        """\
        @Endpoint(dependencies=["fjtinypkg-missing"])
        def e(): pass
        """,
    )
    r = cli("build", str(app), env=offline(wheels, home, installer))
    assert r.returncode == 1
    used = "pip" if installer == "auto" else installer  # auto: uv, then pip says why
    assert r.stdout.startswith(
        f"e: FAILED: installing dependencies ['fjtinypkg-missing'] with {used} failed:\n"
    ), r.stdout
    own = {"pip": "No matching distribution found for fjtinypkg-missing",
           "uv": "fjtinypkg-missing was not found in the provided package locations"}  # fmt: skip
    assert own[used] in r.stdout  # the installer's own words
    if installer == "auto":
        assert "(uv failed first: " in r.stdout
    assert "1 failed" in r.stdout
    assert env_dirs(home) == [] and not list((home / "envs").glob(".build-*"))


def test_build_reports_problems_first_and_fails(tmp_path, wheels):
    home = tmp_path / "home"
    app = write_app(
        tmp_path,
        """\
        GPU = "A100"

        @Endpoint(gpu=GPU)
        def f(): pass

        @Endpoint(dependencies=["fjtinypkg"])
        def g(): pass
        """,
    )
    env = offline(wheels, home)
    r = cli("build", str(app), env=env)
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert lines[0] == (f"problem: {app}:5: gpu=GPU is not a literal: write the value in the "
                        f"decorator, or set it with --set f.gpu=A100")  # fmt: skip
    assert lines[1].startswith("g: environment py") and "built in" in lines[1]
    r = cli("build", str(app), "--set", "f.gpu=A100", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[0] == "f: none: the control plane's own environment"
    r = cli("build", str(app), "--set", "f.gpus=A100", env=env)
    assert r.returncode == 2 and "did you mean 'gpu'" in r.stderr
    r = cli("build", env=env)
    assert r.returncode == 2 and "give a PATH" in r.stderr
    # The old form still builds one set of requirements.
    r = cli("build", "--deps", "fjtinypkg", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "--deps: environment py" in r.stdout and " cached" in r.stdout


def test_cold_start_says_how_its_environment_came(own_server, monkeypatch, name, tmp_path, wheels):
    s = own_server(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels))
    client = use_server(s, monkeypatch)

    def value():
        import fjtinypkg

        return fjtinypkg.VALUE

    # Never built: this cold start installs it.
    first = Endpoint(name=name + "-a", dependencies=["fjtinypkg"], idle_timeout=30)(value)
    job = first.submit()
    assert job.result(timeout=60) == 42
    info = job.info()
    assert info["cold"] is True and info["environment"] == "installed at request time"
    assert info["coldStartPhases"]["environment"] > 0
    (w,) = [w for w in client.endpoint(name + "-a")["workers"] if w["pid"]]
    assert w["env_source"] == "installed at request time"
    f = receipts.receipt_fields(name, info, None)
    assert "(environment installed at request time " in " · ".join(receipts.receipt_parts(f))

    # Built ahead by `flash-jupyter build` in the control plane's data directory.
    app = write_app(
        tmp_path,
        f"""\
        @Endpoint(name="{name}-b", dependencies=["fjtinypkg==0.1"])
        def value():
            import fjtinypkg
            return fjtinypkg.VALUE
        """,
    )
    r = cli("build", str(app), env=offline(wheels, s.data_dir))
    assert r.returncode == 0 and " built in " in r.stdout, r.stdout + r.stderr
    second = Endpoint(name=name + "-b", dependencies=["fjtinypkg==0.1"], idle_timeout=30)(value)
    job = second.submit()
    assert job.result(timeout=60) == 42
    info = job.info()
    assert info["cold"] is True and info["environment"] == "pre-installed"
    (w,) = [w for w in client.endpoint(name + "-b")["workers"] if w["pid"]]
    assert w["env_source"] == "pre-installed"
    f = receipts.receipt_fields(name, info, None)
    assert "(environment pre-installed " in " · ".join(receipts.receipt_parts(f))

    # A third endpoint with the first one's set: built by the first cold start, so found.
    third = Endpoint(name=name + "-c", dependencies=["fjtinypkg"], idle_timeout=30)(value)
    job = third.submit()
    assert job.result(timeout=60) == 42
    assert job.info()["environment"] == "pre-installed"

    # No dependencies: no environment to speak of.
    plain = Endpoint(name=name + "-d", idle_timeout=30)(lambda: 1)
    job = plain.submit()
    assert job.result(timeout=60) == 1
    info = job.info()
    assert info["cold"] is True and info["environment"] is None
    (w,) = [w for w in client.endpoint(name + "-d")["workers"] if w["pid"]]
    assert w["env_source"] is None


def test_envs_lists_and_prunes(own_server, monkeypatch, name, tmp_path, wheels):
    s = own_server(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels))
    use_server(s, monkeypatch)
    env = offline(wheels, s.data_dir)
    app = write_app(
        tmp_path,
        f"""\
        @Endpoint(name="{name}-used", dependencies=["fjtinypkg"])
        def used(): pass

        @Endpoint(name="{name}-unused", dependencies=["fjtinypkg==0.1"])
        def unused(): pass
        """,
    )
    r = cli("build", str(app), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    used_key = envs.env_key(["fjtinypkg"])
    unused_key = envs.env_key(["fjtinypkg==0.1"])
    assert env_dirs(s.data_dir) == sorted([used_key, unused_key])

    # Only the first is registered with the control plane.
    Endpoint(name=name + "-used", dependencies=["fjtinypkg"])(lambda: 1).deploy()
    wait_for(lambda: name + "-used" in registered_endpoints(s.data_dir), what="the endpoint row")
    os.utime(s.data_dir / "envs" / unused_key / ".ready", (time.time() - 7200,) * 2)

    r = cli("envs", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["ENVIRONMENT", "SIZE", "LAST", "USE", "USED", "BY", "REQUIREMENTS"]
    rows = {ln.split()[0]: ln for ln in lines[1:3]}
    assert re.search(rf"kB +\d+ s ago +{name}-used +fjtinypkg$", rows[used_key]), lines
    assert re.search(r"kB +2 h ago +- +fjtinypkg==0\.1$", rows[unused_key]), lines
    assert lines[1].startswith(used_key)  # most recently used first
    assert lines[3].startswith("2 environments, ") and "1 used by no endpoint" in lines[3]

    r = cli("envs", "prune", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[0].startswith(f"removed {unused_key} (")
    assert "removed 1 environment, " in r.stdout and "kept 1 that endpoints use" in r.stdout
    assert env_dirs(s.data_dir) == [used_key]

    r = cli("envs", "prune", "--all", env=env)
    assert r.returncode == 0 and f"removed {used_key} (" in r.stdout
    assert env_dirs(s.data_dir) == []
    assert cli("envs", env=env).stdout.startswith("no dependency environments in ")


def test_uv_gets_pips_settings(tmp_path):
    args, env = envs.uv_options({
        "index-url": "https://mirror/simple", "extra-index-url": "file:///a file:///b",
        "find-links": str(tmp_path), "no-index": "1", "constraint": str(tmp_path / "none.txt"),
        "cert": "/etc/ssl/x.pem", "default-timeout": "180",
    })  # fmt: skip
    # A constraints file that is not there is left out.
    assert args == ["--index-url", "https://mirror/simple", "--extra-index-url", "file:///a",
                    "--extra-index-url", "file:///b", "--find-links", str(tmp_path),
                    "--no-index"]  # fmt: skip
    assert env.get("UV_HTTP_TIMEOUT", os.environ.get("UV_HTTP_TIMEOUT")) is not None
    if "SSL_CERT_FILE" not in os.environ:
        assert env["SSL_CERT_FILE"] == "/etc/ssl/x.pem"


def test_pip_settings_come_from_pip(monkeypatch, tmp_path):
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    got = envs.pip_settings()
    assert got["find-links"] == str(tmp_path) and got["no-index"] == "1"


def test_installer_choice(monkeypatch):
    monkeypatch.setenv("FLASH_JUPYTER_INSTALLER", "pip")
    assert envs.choose_installer() == ("pip", None)
    monkeypatch.setenv("FLASH_JUPYTER_INSTALLER", "conda")
    with pytest.raises(envs.EnvironmentError_, match="use uv, pip or auto"):
        envs.choose_installer()
    monkeypatch.setenv("FLASH_JUPYTER_INSTALLER", "auto")
    assert envs.choose_installer()[0] == ("pip" if NO_UV else "uv")


def test_a_failed_install_fails_the_job_with_the_installers_words(
    own_server, monkeypatch, name, wheels
):
    from flash_jupyter import JobFailed

    s = own_server(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels), FLASH_JUPYTER_INSTALLER="uv"
                   if not NO_UV else "pip")  # fmt: skip
    use_server(s, monkeypatch)
    ep = Endpoint(name=name, dependencies=["fjtinypkg-missing"], idle_timeout=5)(lambda: 1)
    job = ep.submit()
    with pytest.raises(JobFailed) as ei:
        job.result(timeout=60)
    msg = str(ei.value)
    assert "installing dependencies ['fjtinypkg-missing']" in msg
    assert ("fjtinypkg-missing was not found in the provided package locations" in msg
            or "No matching distribution found for fjtinypkg-missing" in msg), msg  # fmt: skip
    assert env_dirs(s.data_dir) == [] and not list((s.data_dir / "envs").glob(".build-*"))
