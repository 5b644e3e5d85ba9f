"""Build the dependency environments of found endpoints ahead of time, so their cold starts
have no install in them (the receipt and the job's ``environment`` field then say
"pre-installed"). One environment per distinct set of requirements, shared by every endpoint
asking for it (``providers.environments``), in the data directory the control plane uses.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .. import paths
from ..providers import environments as envs
from .discover import Found

OWN_ENVIRONMENT = "none: the control plane's own environment"


@dataclass(frozen=True)
class Built:
    """What ``build`` did for one endpoint."""

    endpoint: str
    env_key: str | None  # None: no requirements
    python: str  # what its workers run
    seconds: float  # spent on it now (0 when found or shared)
    outcome: str  # "built", "cached", "none" (no requirements) or "failed"
    requirements: tuple[str, ...] = ()
    installer: str | None = None  # "uv" or "pip" when built now
    note: str = ""  # uv fell back to pip, shared with another endpoint...
    error: str | None = None  # the installer's own message when it failed


def describe(requirements: Iterable[str]) -> str:
    reqs = list(requirements)
    return ", ".join(reqs) if reqs else OWN_ENVIRONMENT


def build(
    found: list[Found],
    echo: Callable[[str], None] = print,
    data_dir: Path | None = None,
) -> list[Built]:
    """Build (or find) the environment of every endpoint in ``found``, echoing one line
    each. An endpoint found more than once (cells sharing one) with the same requirements
    is built once."""
    data_dir = paths.home() if data_dir is None else Path(data_dir)
    sharing: dict[tuple, list[str]] = {}  # requirement set -> endpoint names, in order
    for f in found:
        names = sharing.setdefault(_wants(f), [])
        if f.name not in names:
            names.append(f.name)
    done: dict[tuple, Built] = {}
    seen: set[tuple] = set()
    out: list[Built] = []
    for f in found:
        wants = _wants(f)
        if (f.name, wants) in seen:
            continue  # one more cell of an endpoint already built
        seen.add((f.name, wants))
        deps, sysdeps = wants
        first = done.get(wants)
        if first is not None:  # another endpoint with the same set: one environment
            b = Built(f.name, first.env_key, first.python, 0.0,
                      "failed" if first.outcome == "failed" else ("none" if not deps else "cached"),
                      deps, None, f"shared with {first.endpoint}", first.error)  # fmt: skip
        else:
            b = _build_one(f.name, deps, sysdeps, data_dir, sharing[wants])
            done[wants] = b
        out.append(b)
        echo(line(b))
    return out


def _wants(f: Found) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return envs.requirement_set(f.config.dependencies), tuple(f.config.system_dependencies)


def _build_one(
    name: str,
    deps: tuple[str, ...],
    sysdeps: tuple[str, ...],
    data_dir: Path,
    built_for: list[str],
) -> Built:
    try:
        env = envs.prepare(data_dir, deps, sysdeps, built_for=built_for)
    except envs.EnvironmentError_ as e:
        return Built(name, envs.env_key(deps) if deps else None, "", 0.0, "failed", deps,
                     error=str(e))  # fmt: skip
    if env.key is None:
        return Built(name, None, env.python, env.seconds, "none", deps)
    outcome = "cached" if env.source == envs.PRE_INSTALLED else "built"
    return Built(name, env.key, env.python, env.seconds, outcome, deps, env.installer,
                 env.note)  # fmt: skip


def line(b: Built) -> str:
    """One endpoint's line of ``flash-jupyter build``."""
    if b.outcome == "failed":
        return f"{b.endpoint}: FAILED: {b.error}"
    if b.outcome == "none":
        return f"{b.endpoint}: {OWN_ENVIRONMENT}"
    head = f"{b.endpoint}: environment {b.env_key} ({describe(b.requirements)})"
    if b.outcome == "cached":
        why = f"; {b.note}" if b.note else ""
        return f"{head} cached{why}"
    note = f"; {b.note}" if b.note else ""
    return f"{head} built in {b.seconds:.1f} s with {b.installer}{note}"


# ------------------------------------------------------------------ which endpoints use what


def registered_endpoints(data_dir: Path | None = None) -> dict[str, tuple[str, ...]]:
    """The endpoints the control plane of ``data_dir`` knows (its database, read only, so
    this works whether it runs or not), with their requirements."""
    db = (paths.home() if data_dir is None else Path(data_dir)) / "flash.db"
    if not db.exists():
        return {}
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2.0)
        try:
            rows = con.execute("SELECT name, config FROM endpoints").fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return {}
    out = {}
    for name, config in rows:
        try:
            deps = json.loads(config).get("dependencies") or []
        except (ValueError, AttributeError):
            deps = []
        out[name] = tuple(deps)
    return out


def users(
    environments: list[envs.EnvInfo], endpoints: dict[str, tuple[str, ...]]
) -> dict[str, list[str]]:
    """Environment key -> the endpoints whose requirements it is (same Python version)."""
    out: dict[str, list[str]] = {e.key: [] for e in environments}
    by_set: dict[tuple, list[str]] = {}
    for e in environments:
        if e.key.startswith(envs.env_key(()).split("-")[0] + "-"):
            by_set.setdefault(envs.requirement_set(e.requirements), []).append(e.key)
    for name, deps in sorted(endpoints.items()):
        for key in by_set.get(envs.requirement_set(deps), []):
            out[key].append(name)
    return out
