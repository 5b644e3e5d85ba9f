"""``flash-jupyter build`` (the environments of a file's endpoints, ahead of time) and
``flash-jupyter envs`` (the environments kept, and pruning them). Neither needs a running
control plane: both work on the data directory (``FLASH_JUPYTER_HOME``)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .. import paths


def add_parsers(sub: Any) -> None:
    s = sub.add_parser(
        "build",
        help="find the endpoints of a .py, a package folder or an .ipynb and build their "
        "dependency environments ahead of time",
    )
    s.add_argument("path", nargs="?", help="a .py file, a package folder or a notebook")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME.K=V",
                   help="a setting of endpoint NAME that the file does not give as a literal "
                   "(repeat for more): --set train.gpu=A100")  # fmt: skip
    s.add_argument("--deps", help="or: one environment for these comma-separated requirements")
    s = sub.add_parser("envs", help="the dependency environments kept, their size and last use")
    s.add_argument("action", nargs="?", choices=["prune"],
                   help="prune: remove the environments no endpoint uses")  # fmt: skip
    s.add_argument("--all", action="store_true", help="with prune: remove every environment")
    s.add_argument(
        "--unused-for",
        type=duration,
        metavar="DURATION",
        help="with prune: only environments not used for this long (30m, 12h, 7d)",
    )


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str) -> float:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"45s"``, ``"2w"`` (or ``"1d12h"``) in seconds."""
    t = text.strip().lower()
    total, number, parts = 0.0, "", 0
    for ch in t:
        if ch.isdigit() or ch == ".":
            number += ch
        elif ch in _UNITS and number:
            try:
                total += float(number) * _UNITS[ch]
            except ValueError:
                break
            number, parts = "", parts + 1
        else:
            break
    else:
        if parts and not number:
            return total
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a duration: give a number and a unit, e.g. 30m, 12h, 7d (s, m, h, d, w)"
    )


def _duration_text(seconds: float) -> str:
    for unit in ("d", "h", "m"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{seconds / _UNITS[unit]:g}{unit}"
    return f"{seconds:g}s"


def run(a: argparse.Namespace) -> int:
    if a.cmd == "build":
        return _build(a)
    if a.cmd == "envs":
        if a.action != "prune" and (a.all or a.unused_for is not None):
            _err("--all and --unused-for go with prune: flash-jupyter envs prune --unused-for 7d")
            return 2
        return _prune(a) if a.action == "prune" else _list()
    return 2


def _err(msg: str) -> None:
    print(f"flash-jupyter: {msg}", file=sys.stderr)


def _build(a: argparse.Namespace) -> int:
    from ..config import BY_NAME
    from ..errors import ConfigError
    from .build import build, describe
    from .discover import Found, discover, parse_overrides

    if a.deps is not None and (a.path or a.overrides):
        _err("give a PATH or --deps, not both")
        return 2
    if a.deps is not None:
        from ..config import EndpointConfig

        try:
            deps = tuple(BY_NAME["dependencies"].parse_text(a.deps))
            config = EndpointConfig.build("deps", dependencies=deps)
        except ConfigError as e:
            _err(str(e))
            return 2
        found = [Found("--deps", "function", {"dependencies": deps}, config, paths.home(),
                       None, None, None, None, 0)]  # fmt: skip
        problems: list[str] = []
        notes: list[str] = []
    elif a.path:
        try:
            overrides = parse_overrides(a.overrides)
        except ConfigError as e:
            _err(str(e))
            return 2
        d = discover(a.path, overrides)
        found, problems, notes = d.endpoints, d.problems, d.notes
    else:
        _err("build what? give a PATH (a .py, a package folder, an .ipynb) or --deps a,b")
        return 2
    for p in problems:
        print(f"problem: {p}")
    for n in notes:
        print(f"note: {n}")
    if not found:
        print(f"no endpoints found in {a.path}" if a.path else "nothing to build")
        return 1 if problems else 0
    t = time.monotonic()
    built = build(found)
    failed = [b for b in built if b.outcome == "failed"]
    envs = {b.env_key for b in built if b.env_key and b.outcome != "failed"}
    made = sum(1 for b in built if b.outcome == "built")
    print(f"{len(built)} endpoint{'s' if len(built) != 1 else ''}, {len(envs)} environment"
          f"{'s' if len(envs) != 1 else ''} ({made} built) in {time.monotonic() - t:.1f} s"
          + (f"; {len(failed)} failed" if failed else "")
          + (f"; {len(problems)} problem{'s' if len(problems) != 1 else ''} above"
             if problems else ""))  # fmt: skip
    if a.deps is not None and not failed:
        print(f"{describe(built[0].requirements)}: {built[0].python}")
    return 1 if failed or problems else 0


def _ago(t: float) -> str:
    s = max(0.0, time.time() - t)
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 90 * 60:
        return f"{s / 60:.0f} min ago"
    if s < 36 * 3600:
        return f"{s / 3600:.0f} h ago"
    return f"{s / 86400:.0f} days ago"


def size_text(n: int) -> str:
    for unit, step in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= step:
            return f"{n / step:.1f} {unit}"
    return f"{n} B"


def _list() -> int:
    from ..providers.environments import list_environments
    from .build import registered_endpoints, users

    data_dir = paths.home()
    found = list_environments(data_dir)
    if not found:
        print(f"no dependency environments in {data_dir / 'envs'}")
        return 0
    used = users(found, registered_endpoints(data_dir))
    rows = [("ENVIRONMENT", "SIZE", "LAST USE", "USED BY", "REQUIREMENTS")]
    for e in found:
        by = ", ".join(used.get(e.key, [])) or "-"
        rows.append((e.key, size_text(e.size), _ago(e.last_used), by, ", ".join(e.requirements)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    total = sum(e.size for e in found)
    unused = sum(1 for e in found if not used.get(e.key))
    print(f"{len(found)} environment{'s' if len(found) != 1 else ''}, {size_text(total)}, in "
          f"{data_dir / 'envs'}; {unused} used by no endpoint (flash-jupyter envs prune "
          f"removes those)")  # fmt: skip
    return 0


def _prune(a: argparse.Namespace) -> int:
    from ..providers.environments import list_environments, prune
    from .build import registered_endpoints, users

    data_dir = paths.home()
    used = users(list_environments(data_dir), registered_endpoints(data_dir))
    keep = {k for k, names in used.items() if names}
    removed = prune(data_dir, keep, everything=a.all, unused_for=a.unused_for)
    for e in removed:
        print(f"removed {e.key} ({size_text(e.size)}): {', '.join(e.requirements)}")
    left = {e.key for e in list_environments(data_dir)}
    kept = len(left & keep) if not a.all else 0
    recent = len(left) - kept if a.unused_for is not None else 0
    print(f"removed {len(removed)} environment{'s' if len(removed) != 1 else ''}, "
          f"{size_text(sum(e.size for e in removed))}"
          + (f"; kept {kept} that endpoints use" if kept else "")
          + (f"; kept {recent} used in the last {_duration_text(a.unused_for)}"
             if recent else ""))  # fmt: skip
    return 0
