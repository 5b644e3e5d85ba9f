"""Where flash-jupyter keeps its files, and the runtime file that finds the control plane."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

from . import envvars

_warned: set[str] = set()  # folders already warned about in this process


def home() -> Path:
    """The data dir: ``FLASH_JUPYTER_HOME``, else the user's data dir."""
    env = envvars.get("FLASH_JUPYTER_HOME")
    if env:
        return Path(env).expanduser()
    if sys.platform == "darwin":
        base = Path("~/Library/Application Support").expanduser()
    else:
        base = Path(envvars.get("XDG_DATA_HOME") or "~/.local/share").expanduser()
    return base / "flash-jupyter"


def warn(message: str) -> None:
    print(f"flash-jupyter: warning: {message}", file=sys.stderr, flush=True)


def ensure_private_dir(p: Path) -> Path:
    """The folder ``p``, created with mode 0700 if it does not exist.

    A folder that already exists is left as it is (it may be shared on purpose, or be the
    user's own choice of ``FLASH_JUPYTER_HOME``): if other users can reach it, or it belongs
    to someone else, this warns once per process instead of changing it. The files that
    hold secrets (``runtime.json``, ``server.json``) are written with mode 0600 anyway.
    """
    p = Path(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(p, 0o700)
        return p
    except FileExistsError:
        pass
    st = os.stat(p)  # a symlink to a folder is a fine FLASH_JUPYTER_HOME: follow it
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"{p} exists and is not a folder")
    mode = stat.S_IMODE(st.st_mode)
    problems = []
    if st.st_uid != os.getuid():
        problems.append(f"belongs to uid {st.st_uid}, not to this user (uid {os.getuid()})")
    if mode & 0o077:
        problems.append(f"has mode {mode:04o}: other users can reach what it holds")
    if problems and str(p) not in _warned:
        _warned.add(str(p))
        warn(
            f"{p} {' and '.join(problems)}. flash-jupyter leaves it as it is (runtime.json "
            f"and server.json stay mode 0600); `chmod 700 {p}` makes it all private."
        )
    return p


def runtime_file(data_dir: Path | None = None) -> Path:
    return (data_dir or home()) / "runtime.json"


def write_private_json(path: Path, info: dict[str, Any]) -> Path:
    """Write a JSON file atomically, readable by the user alone.

    The folder may be reachable by other users (an existing ``FLASH_JUPYTER_HOME`` is left
    as it is), so the temporary file gets an unguessable name and is created anew, never
    through a link or a file someone else put there.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def write_runtime(info: dict[str, Any], data_dir: Path) -> Path:
    """Write the runtime file atomically, readable by the user alone."""
    return write_private_json(runtime_file(data_dir), info)


def read_runtime(data_dir: Path | None = None) -> dict[str, Any] | None:
    try:
        return json.loads(runtime_file(data_dir).read_text())
    except (OSError, ValueError):
        return None


def settings_file(data_dir: Path | None = None) -> Path:
    """``server.json``: what stays the same across restarts of a data dir's control plane
    (token, ports, a spool folder chosen instead of the default one)."""
    return (data_dir or home()) / "server.json"


def read_settings(data_dir: Path | None = None) -> dict[str, Any]:
    try:
        saved = json.loads(settings_file(data_dir).read_text())
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def update_settings(data_dir: Path, **values: Any) -> dict[str, Any]:
    """Merge ``values`` into ``server.json`` (mode 0600); only the control plane writes it,
    while it holds the data dir's lock."""
    saved = read_settings(data_dir)
    merged = {**saved, **values}
    if merged != saved or not settings_file(data_dir).exists():
        write_private_json(settings_file(data_dir), merged)
    return merged


def boot_id() -> str:
    """Identifies this machine's current boot: equal boot ids can share /dev/shm files."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        import socket

        return socket.gethostname()


def private_dir_problem(path: Path, uid: int | None = None) -> str | None:
    """Why ``path`` is not a folder private to ``uid`` (default: this user), or None.

    Looks at the path itself (``lstat``): a symbolic link is refused, wherever it points.
    """
    uid = os.getuid() if uid is None else uid
    try:
        st = os.lstat(path)
    except OSError as e:
        return f"cannot be examined ({e.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    if st.st_uid != uid:
        return f"belongs to uid {st.st_uid}, not to this user (uid {uid})"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        return f"has mode {mode:04o}: other users can reach it"
    return None


def _claim_private_dir(path: Path) -> str | None:
    """Create ``path`` with mode 0700, or accept it if it already is this user's private
    folder. Returns what is wrong with it, or None. Never changes an existing folder."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        return f"cannot be created ({e.strerror})"
    return private_dir_problem(path)


def default_spool_dir(data_dir: Path) -> Path:
    """The spool folder a data dir uses unless that one is refused: a name anyone can
    work out, in /dev/shm (else under the data dir)."""
    import hashlib

    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else data_dir / "spool"
    tag = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:10]
    return base / f"flash-jupyter-{os.getuid()}-{tag}"


def spool_dir(data_dir: Path) -> Path:
    """Shared-memory spool for large buffers (tmpfs when the OS has one).

    One per data dir, stable across restarts: queued jobs keep referring to their files.
    The default folder has a predictable name in a folder every user can write to, so
    another user could make it first. It is used only if it is a real folder (not a
    symlink) of this user's with no group or other access; otherwise a folder with a random
    name takes its place, and ``server.json`` records it so that later starts use it too.
    """
    import tempfile

    default = default_spool_dir(data_dir)
    saved = read_settings(data_dir).get("spool")
    candidate = Path(saved) if isinstance(saved, str) and saved else default
    if candidate == default:
        default.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # no /dev/shm: data dir
    problem = _claim_private_dir(candidate)
    if problem is None:
        return candidate
    base = default.parent
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    fallback = Path(tempfile.mkdtemp(prefix=f"flash-jupyter-{os.getuid()}-", dir=base))
    still = private_dir_problem(fallback)
    if still is not None:  # cannot happen with mkdtemp, short of a broken file system
        raise RuntimeError(f"flash-jupyter: the new spool folder {fallback} {still}")
    update_settings(data_dir, spool=str(fallback))
    warn(
        f"the spool folder {candidate} {problem}; not using it (left untouched). Using "
        f"{fallback} instead, recorded in {settings_file(data_dir)}."
    )
    return fallback
