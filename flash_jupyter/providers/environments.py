"""Dependency environments: one virtual environment per distinct set of requirements.

Keyed by the sorted requirements, the Python version and the control plane's interpreter
(``env_key``), built once and shared by every endpoint asking for the same set: the
"pre-installed in the image" of Runpod. An environment is layered on the control plane's
interpreter: a ``.pth`` file lists that interpreter's package folders after the
environment's own, so flash-jupyter, its serializer and whatever the notebook already has
(numpy, torch...) are seen at their versions without being installed again. Only what the
requirements add, or need at another version, goes into the environment.

Built with uv when it is there (``uv`` on PATH or the ``uv`` package's binary), else with
pip (``FLASH_JUPYTER_INSTALLER`` chooses). uv is given pip's own settings (``pip config
list``: indexes, find-links, constraints), so what pip would find uv finds; uv resolves
against the control plane's interpreter (a dry run: it reports only what is missing or
incompatible there), then installs exactly that. When uv cannot resolve the requirements,
pip tries and the result says so.

A build happens in a temporary folder next to the cache, is byte-compiled (``_compile``: a
worker's first import then reads .pyc files) and is renamed into place at the end, under a
file lock: a failed or interrupted build leaves nothing in the cache. The
``.ready`` file of a finished environment records its requirements, size and build time;
its modification time is the last use.
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .. import envvars

PRE_INSTALLED = "pre-installed"  # the environment existed when the worker started
AT_REQUEST = "installed at request time"  # the worker's start built it (or waited for it)
INSTALLERS = ("auto", "uv", "pip")
_TAIL_LINES = 15  # lines of the installer's output an error keeps


class EnvironmentError_(RuntimeError):
    """Building a dependency environment failed; the message carries the installer's own
    last lines."""


@dataclass(frozen=True)
class Environment:
    """What ``prepare`` found or built for one set of requirements."""

    python: str  # the interpreter workers of that environment run
    key: str | None  # its folder under envs/; None: no requirements (this interpreter)
    source: str | None  # PRE_INSTALLED, AT_REQUEST, or None (no environment)
    seconds: float  # spent here: the build, or waiting for someone else's
    installer: str | None = None  # "uv" or "pip" when built now
    note: str = ""  # e.g. uv could not resolve and pip did


@dataclass(frozen=True)
class EnvInfo:
    """One finished environment in the cache (``list_environments``)."""

    key: str
    path: Path
    requirements: tuple[str, ...]
    python_version: str  # "3.11"
    installer: str  # what built it
    size: int  # bytes on disk
    built: float  # wall time
    seconds: float  # how long the build took
    last_used: float  # wall time (the .ready file's modification time)
    built_for: tuple[str, ...] = ()  # endpoints `flash-jupyter build` built it for
    note: str = ""


# ------------------------------------------------------------------ keys and paths


def env_key(dependencies: Iterable[str]) -> str:
    """``py311-<hash>``: the environment's folder name for these requirements."""
    py = f"py{sys.version_info[0]}{sys.version_info[1]}"
    # The environment layers on top of this interpreter's environment (see _parent_paths).
    key = json.dumps([sorted(dependencies), sys.prefix])
    return f"{py}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def envs_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "envs"


def _parent_paths() -> list[str]:
    """Where this interpreter finds packages (site-packages, editable installs), so a
    dependency environment sees flash-jupyter and its serializer at the same versions."""
    stdlib = {os.path.realpath(p) for p in (sysconfig.get_paths()["stdlib"],
                                            sysconfig.get_paths()["platstdlib"])}  # fmt: skip
    out = []
    for p in sys.path:
        if not p or not os.path.isdir(p):
            continue
        real = os.path.realpath(p)
        if real in stdlib or real.endswith("lib-dynload") or real in out:
            continue
        out.append(real)
    return out


# ------------------------------------------------------------------ installers


def find_uv() -> str | None:
    """The uv binary: on PATH, else the one the ``uv`` Python package ships."""
    found = shutil.which("uv")
    if found:
        return found
    try:
        from uv import find_uv_bin  # the PyPI package `uv`

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        return None


def choose_installer() -> tuple[str, str | None]:
    """``("uv", path)`` or ``("pip", None)``, as ``FLASH_JUPYTER_INSTALLER`` asks."""
    wanted = (envvars.get("FLASH_JUPYTER_INSTALLER") or "auto").strip().lower()
    if wanted not in INSTALLERS:
        raise EnvironmentError_(
            f"FLASH_JUPYTER_INSTALLER={wanted!r} is not valid: use uv, pip or auto"
        )
    if wanted == "pip":
        return "pip", None
    uv = find_uv()
    if uv is None and wanted == "uv":
        raise EnvironmentError_(
            "FLASH_JUPYTER_INSTALLER=uv but uv is not installed: `pip install uv` (or "
            "unset FLASH_JUPYTER_INSTALLER to use pip)"
        )
    return ("uv", uv) if uv else ("pip", None)


_pip_settings_cache: dict[tuple, dict[str, str]] = {}


def pip_settings() -> dict[str, str]:
    """pip's effective settings (``pip config list``: its files and ``PIP_*`` variables),
    by option name; the ``install`` section over ``global``, variables over both."""
    snapshot = (sys.executable, tuple(sorted((k, v) for k, v in os.environ.items()
                                             if k.startswith("PIP_"))))  # fmt: skip
    cached = _pip_settings_cache.get(snapshot)
    if cached is not None:
        return cached
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                          capture_output=True, text=True)  # fmt: skip
    rank = {"global": 0, "install": 1, ":env:": 2}
    best: dict[str, tuple[int, str]] = {}
    for line in proc.stdout.splitlines():
        key, sep, raw = line.partition("=")
        section, dot, option = key.partition(".")
        if not sep or not dot or section not in rank:
            continue
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        r = rank[section]
        if option not in best or r >= best[option][0]:
            best[option] = (r, str(value))
    out = {k: v for k, (_, v) in best.items()}
    _pip_settings_cache[snapshot] = out
    return out


def _truthy(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def uv_options(settings: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """pip's settings as uv's arguments and environment: the same indexes, find-links and
    constraints, so a requirement pip can satisfy (from a local file, say) uv can too."""
    args: list[str] = []
    env: dict[str, str] = {}
    if settings.get("index-url"):
        args += ["--index-url", settings["index-url"]]
    for url in settings.get("extra-index-url", "").split():
        args += ["--extra-index-url", url]
    for link in settings.get("find-links", "").split():
        args += ["--find-links", link]
    for c in settings.get("constraint", "").split():
        if os.path.exists(c):
            args += ["--constraint", c]
    if _truthy(settings.get("no-index", "")):
        args.append("--no-index")
    if _truthy(settings.get("pre", "")):
        args += ["--prerelease", "allow"]
    for host in settings.get("trusted-host", "").split():
        args += ["--allow-insecure-host", host]
    if settings.get("cert") and "SSL_CERT_FILE" not in os.environ:
        env["SSL_CERT_FILE"] = settings["cert"]
    timeout = settings.get("timeout") or settings.get("default-timeout")
    if timeout and "UV_HTTP_TIMEOUT" not in os.environ:
        env["UV_HTTP_TIMEOUT"] = timeout
    return args, env


def _first_error(text: str) -> str:
    """The line of an installer's output that says what went wrong, shortened."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    pick = next((ln for ln in lines if ln.lower().startswith("cause")), "")
    pick = pick or next((ln for ln in lines if ln.lower().startswith("error")), "")
    pick = pick or (lines[-1] if lines else "no output")
    return pick if len(pick) <= 200 else pick[:197] + "..."


def _tail(text: str) -> str:
    return "\n".join(text.strip().splitlines()[-_TAIL_LINES:])


class _InstallFailed(Exception):
    def __init__(self, installer: str, output: str):
        super().__init__(output)
        self.installer, self.output = installer, output


def _pip_install(python: Path, deps: tuple[str, ...]) -> None:
    # --no-compile: _compile does it after the install, with the final folder's paths.
    cmd = [sys.executable, "-m", "pip", "--python", str(python), "install",
           "--disable-pip-version-check", "--no-input", "--no-compile", *deps]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        raise _InstallFailed("pip", proc.stdout + proc.stderr)


def _uv_install(uv: str, python: Path, deps: tuple[str, ...]) -> None:
    """Resolve against this interpreter (what it has counts as installed), then install
    what is missing, pinned as resolved, into the environment."""
    args, extra_env = uv_options(pip_settings())
    env = {**os.environ, **extra_env}
    env.pop("VIRTUAL_ENV", None)  # --python says where
    plan = subprocess.run(
        [uv, "pip", "install", "--python", sys.executable, "--dry-run", "--color", "never",
         "--break-system-packages", *args, *deps],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    if plan.returncode != 0:
        raise _InstallFailed("uv", plan.stdout + plan.stderr)
    wanted = [line[3:].strip() for line in (plan.stdout + plan.stderr).splitlines()
              if line.startswith(" + ")]  # fmt: skip
    if not wanted:
        return  # this interpreter already has all of it
    proc = subprocess.run(
        [uv, "pip", "install", "--python", str(python), "--no-deps", *args, *wanted],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    if proc.returncode != 0:
        raise _InstallFailed("uv", proc.stdout + proc.stderr)


# ------------------------------------------------------------------ building


def _du(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _compile(python: Path, tmp: Path, final: Path) -> None:
    """Byte-compile the environment's own packages, so its first ``import torch`` does not
    compile thousands of modules (or compile them on every import where
    ``PYTHONDONTWRITEBYTECODE`` is set: workers inherit it). The recorded paths name the
    final folder (``-s``/``-p``); a .pyc is checked against its source's size and time,
    which the rename keeps. Best effort: a module that does not compile is compiled (or
    reported) at import, as without this step."""
    sites = {sysconfig.get_path(k, vars={"base": str(tmp), "platbase": str(tmp)})
             for k in ("purelib", "platlib")}  # fmt: skip
    sites = sorted(s for s in sites if os.path.isdir(s))
    if not sites:
        return
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # this step is for writing it
    env.pop("PYTHONPYCACHEPREFIX", None)  # next to the sources, where workers look
    subprocess.run(
        [str(python), "-m", "compileall", "-q", "-j", "0", "-s", str(tmp), "-p", str(final),
         *sites],
        capture_output=True, env=env,
    )  # fmt: skip


def _relocate(tmp: Path, final: Path) -> None:
    """Scripts and pyvenv.cfg name the folder they were made in: name the final one."""
    old, new = str(tmp).encode(), str(final).encode()
    for p in [*(tmp / "bin").iterdir(), tmp / "pyvenv.cfg"]:
        try:
            if p.is_symlink() or not p.is_file() or p.stat().st_size > 1 << 20:
                continue
            data = p.read_bytes()
            if old in data:
                mode = p.stat().st_mode
                p.write_bytes(data.replace(old, new))
                os.chmod(p, mode)
        except OSError:
            pass


def _build(
    root: Path, key: str, deps: tuple[str, ...], built_for: tuple[str, ...]
) -> tuple[str, str]:
    """Build the environment in a temporary folder and rename it to ``root/key``; the
    installer used and a note. Raises EnvironmentError_ with the installer's message."""
    name, uv = choose_installer()
    final = root / key
    for stale in root.glob(f".build-{key}-*"):  # an interrupted build (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".build-{key}-{os.getpid()}-{os.urandom(3).hex()}"
    t0 = time.time()
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp)],
                       check=True, capture_output=True)  # fmt: skip
        site = sysconfig.get_path("purelib", vars={"base": str(tmp), "platbase": str(tmp)})
        Path(site).mkdir(parents=True, exist_ok=True)
        # After the environment's own packages: what the control plane's interpreter sees.
        Path(site, "_flash_jupyter_parent.pth").write_text("\n".join(_parent_paths()) + "\n")
        python = tmp / "bin" / "python"
        note = ""
        try:
            if name == "uv":
                assert uv is not None
                try:
                    _uv_install(uv, python, deps)
                except _InstallFailed as e:
                    if envvars.get("FLASH_JUPYTER_INSTALLER").strip().lower() == "uv":
                        raise
                    first = _first_error(e.output)
                    try:
                        _pip_install(python, deps)
                    except _InstallFailed as e2:
                        e2.output = f"(uv failed first: {first})\n{e2.output}"
                        raise
                    name = "pip"
                    note = f"uv could not install them ({first}); pip did"
            else:
                _pip_install(python, deps)
        except _InstallFailed as e:
            raise EnvironmentError_(
                f"installing dependencies {list(deps)} with {e.installer} failed:\n"
                f"{_tail(e.output)}"
            ) from None
        _compile(python, tmp, final)  # part of the build: its time is in "seconds"
        _relocate(tmp, final)
        record = {
            "requirements": list(deps),
            "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
            "parent": sys.prefix,
            "installer": name,
            "note": note,
            "built": t0,
            "seconds": round(time.time() - t0, 3),
            "size": _du(tmp),
            "built_for": list(built_for),
        }
        (tmp / ".ready").write_text(json.dumps(record, indent=1))
        if final.exists():  # left by an older flash-jupyter that built in place
            shutil.rmtree(final)
        os.rename(tmp, final)
        return name, note
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_system(system_dependencies: Iterable[str]) -> None:
    missing = [d for d in system_dependencies if shutil.which(d) is None]
    if missing:
        raise EnvironmentError_(
            f"system dependencies not installed on this host: {', '.join(missing)} "
            f"(the local provider does not install system packages; install them first)"
        )


def prepare(
    data_dir: Path,
    dependencies: Iterable[str],
    system_dependencies: Iterable[str] = (),
    built_for: Iterable[str] = (),
) -> Environment:
    """The environment for ``dependencies``, built now if it does not exist yet.

    ``source`` says which: PRE_INSTALLED (it was there: only its last use is noted) or
    AT_REQUEST (built now, or waited for while another process built it). No requirements:
    this interpreter, source None. ``built_for`` names the endpoints a build is for (shown
    by ``flash-jupyter envs``)."""
    t0 = time.monotonic()
    _check_system(system_dependencies)
    deps = tuple(dependencies)
    if not deps:
        return Environment(sys.executable, None, None, 0.0)
    root = envs_dir(data_dir)
    key = env_key(deps)
    target = root / key
    python = str(target / "bin" / "python")
    ready = target / ".ready"
    if _touch(ready):
        return Environment(python, key, PRE_INSTALLED, time.monotonic() - t0)
    root.mkdir(parents=True, exist_ok=True)
    with open(_lock_path(root, key), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _touch(ready):
            return Environment(python, key, AT_REQUEST, time.monotonic() - t0)
        installer, note = _build(root, key, deps, tuple(built_for))
    return Environment(python, key, AT_REQUEST, time.monotonic() - t0, installer, note)


def _lock_path(root: Path, key: str) -> Path:
    # Kept after a prune: removing a lock file others may be waiting on would let two
    # builds of one environment run at once.
    return root / f".lock-{key}"


def _touch(ready: Path) -> bool:
    """Note a use of the environment whose .ready this is; False when it does not exist."""
    try:
        os.utime(ready)
        return True
    except FileNotFoundError:
        return False


def mark_used(data_dir: Path, key: str) -> bool:
    """Note a use of environment ``key`` (a spare started from it taking a worker's place,
    say): ``flash-jupyter envs`` shows it as the last use. False when it does not exist."""
    return _touch(envs_dir(data_dir) / key / ".ready")


def ensure_environment(
    data_dir: Path, dependencies: tuple[str, ...], system_dependencies: tuple[str, ...] = ()
) -> str:
    """The python executable of the environment for ``dependencies``, built if needed."""
    return prepare(data_dir, dependencies, system_dependencies).python


# ------------------------------------------------------------------ the cache


def list_environments(data_dir: Path) -> list[EnvInfo]:
    """The finished environments in the cache, most recently used first."""
    root = envs_dir(data_dir)
    out = []
    if not root.is_dir():
        return out
    for d in root.iterdir():
        ready = d / ".ready"
        if d.name.startswith(".") or not ready.is_file():
            continue
        try:
            rec = json.loads(ready.read_text() or "{}")
            used = ready.stat().st_mtime
        except (OSError, ValueError):
            rec, used = {}, 0.0
        reqs = rec.get("requirements", rec.get("dependencies", []))
        out.append(EnvInfo(
            key=d.name, path=d, requirements=tuple(reqs),
            python_version=rec.get("python", ""), installer=rec.get("installer", "pip"),
            size=rec.get("size") if isinstance(rec.get("size"), int) else _du(d),
            built=float(rec.get("built", used)), seconds=float(rec.get("seconds", 0.0)),
            last_used=used, built_for=tuple(rec.get("built_for", ())),
            note=rec.get("note", ""),
        ))  # fmt: skip
    out.sort(key=lambda e: e.last_used, reverse=True)
    return out


def requirement_set(dependencies: Iterable[str]) -> tuple[str, ...]:
    """The requirements as a cache entry is matched by (sorted, as the key is)."""
    return tuple(sorted(dependencies))


def prune(
    data_dir: Path,
    keep: Iterable[str] = (),
    *,
    everything: bool = False,
    unused_for: float | None = None,
) -> list[EnvInfo]:
    """Remove cached environments: those whose key is not in ``keep`` (the ones endpoints
    use), or all of them with ``everything``; with ``unused_for``, only those not used for
    that many seconds. Leftovers of interrupted builds go too. An environment being built
    is left alone. Returns what was removed."""
    root = envs_dir(data_dir)
    keep = set(keep)
    removed = []
    now = time.time()
    for env in list_environments(data_dir):
        if not everything and env.key in keep:
            continue
        if unused_for is not None and now - env.last_used < unused_for:
            continue
        if _remove_unlocked(root, env.key, env.path):
            removed.append(env)
    if root.is_dir():  # interrupted builds, and folders without .ready
        for d in root.iterdir():
            if d.name.startswith(".build-") and d.is_dir():
                _remove_unlocked(root, d.name[len(".build-") :].rsplit("-", 2)[0], d)
            elif d.is_dir() and not d.name.startswith(".") and not (d / ".ready").exists():
                _remove_unlocked(root, d.name, d)
    return removed


def _remove_unlocked(root: Path, key: str, path: Path) -> bool:
    """Remove ``path`` unless a build of ``key`` holds its lock now."""
    with open(_lock_path(root, key), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        shutil.rmtree(path, ignore_errors=True)
    return True
