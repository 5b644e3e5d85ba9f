"""An endpoint's configuration: the one list of settings, validation, normal form, and what
counts as a change.

``SETTINGS`` lists every endpoint setting once: its name, other names it may be typed as,
default, how it reads from text, and its help line. Everything that takes settings derives
from it: ``Endpoint(...)`` (the decorator; a test keeps its keywords and defaults equal to
the list), ``%%flash k=v`` tokens (``settings_from_tokens``, ``settings_help``), the CLI
(``parse_workers_text``), and the HTTP API and the wire deploy (``EndpointConfig.from_dict``).
``EndpointConfig.build`` validates them; ``EndpointConfig.changed`` applies some of them to an
existing configuration.

Two hashes decide what an update does:

- ``env_hash`` covers what a running worker was built with (hardware, dependencies,
  environment variables, concurrency). A change makes existing workers Outdated: they finish
  their job and are replaced.
- ``config_hash`` covers everything, including scaling (workers, idle_timeout) and
  execution_timeout, which apply at once without restarting anyone.

Function code is not configuration: it travels with each job.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from . import catalog
from .errors import ConfigError


class WorkersTextError(ConfigError):
    """A worker range typed as text is not ``N`` or ``MIN,MAX`` at all (the CLI exits 2)."""


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
DEFAULT_NAME = "notebook"  # the endpoint of a %%flash cell that names none


@dataclass(frozen=True)
class Setting:
    """One endpoint setting (or, passed as ``extra``, a caller's own ``key=value`` key).

    ``kind`` says how it reads from text (``parse_text``): ``text``, ``int``, ``float``,
    ``float_or_none`` ("none" for no value), ``workers`` (N or MIN,MAX), ``list``
    (comma-separated), ``gpus`` (one type, or a comma-separated list), ``env`` (K=V, may
    repeat: each one adds a variable).
    """

    name: str
    default: Any
    kind: str
    help: str
    example: str = ""  # as shown in help: "workers=MIN,MAX"; default "name=VALUE"
    aliases: tuple[str, ...] = ()
    env: bool = False  # in env_hash: a change replaces the workers

    def parse_text(self, text: str) -> Any:
        """The value of ``name=text``; a bad one is a ConfigError naming the setting."""
        k = self.kind
        if k == "text":
            return text
        if k == "int":
            try:
                return int(text)
            except ValueError:
                raise ConfigError(f"{self.name} must be a whole number, not {text!r}") from None
        if k in ("float", "float_or_none"):
            if k == "float_or_none" and text.strip().lower() in ("", "none"):
                return None
            try:
                return float(text)
            except ValueError:
                raise ConfigError(f"{self.name} must be a number, not {text!r}") from None
        if k == "workers":
            return parse_workers_text(text)
        if k == "list":
            return [p for p in text.split(",") if p]
        if k == "gpus":
            return [p for p in text.split(",") if p] if "," in text else text
        if k == "env":
            key, sep, value = text.partition("=")
            if not sep or not key:
                raise ConfigError(f"env needs K=V, not {text!r}")
            return {key: value}
        raise ValueError(f"unknown setting kind {k!r}")

    @property
    def token(self) -> str:
        return self.example or f"{self.name}=VALUE"


SETTINGS: tuple[Setting, ...] = (
    Setting("name", None, "text", "the endpoint (%%flash: default notebook)", "name=NAME"),
    Setting("gpu", None, "gpus", "a GPU type or alias, or acceptable ones in order of "
            "preference", "gpu=A100 or gpu=H100,A100", env=True),
    Setting("cpu", None, "text", "a CPU instance type instead of a GPU (default cpu3c-2-4 "
            "when no gpu is given)", "cpu=TYPE", env=True),
    Setting("gpu_count", 1, "int", "GPUs per worker (1 to 8)", "gpu_count=N", env=True),
    Setting("workers", (0, 1), "workers", "worker range; N means 0,N (max 1 to 100)",
            "workers=MIN,MAX"),
    Setting("idle_timeout", 60, "float", "seconds a worker stays warm after its last job "
            "(1 to 3600)", "idle_timeout=SECONDS"),
    Setting("dependencies", (), "list", "pip requirements, comma-separated",
            "deps=a,b", aliases=("deps",), env=True),
    Setting("system_dependencies", (), "list", "commands that must exist on the worker host",
            "system_dependencies=a,b", env=True),
    Setting("env", None, "env", "an environment variable of the workers (repeat for more)",
            "env=K=V", env=True),
    Setting("execution_timeout", None, "float_or_none", "seconds a job may run (none: no "
            "limit)", "timeout=SECONDS", aliases=("timeout",)),
    Setting("max_concurrency", 1, "int", "jobs one worker runs at once (1 to 1000)",
            "max_concurrency=N", env=True),
    Setting("preload", (), "list", "modules the workers and the spare worker import before "
            "a job arrives, comma-separated", "preload=torch,numpy"),
)  # fmt: skip

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
ENV_FIELDS = tuple(s.name for s in SETTINGS if s.env)
SCALING_FIELDS = ("workers_min", "workers_max", "idle_timeout", "execution_timeout")
_BUILD_KEYS = tuple(s.name for s in SETTINGS if s.name != "name")


def _lookup(key: str, extra: Iterable[Setting] = ()) -> Setting:
    """The setting a typed key names (``-`` reads as ``_``; aliases allowed)."""
    table = _names(extra)
    s = table.get(key.strip().replace("-", "_"))
    if s is None:
        raise ConfigError(_unknown(key, table))
    return s


def _names(extra: Iterable[Setting] = ()) -> dict[str, Setting]:
    table: dict[str, Setting] = {}
    for s in (*SETTINGS, *extra):
        table[s.name] = s
        for a in s.aliases:
            table[a] = s
    return table


def _unknown(keys: str | list[str], known: Iterable[str], what: str = "setting") -> str:
    """The message for unknown keys: each with a guess at what was meant, then the known."""
    known = sorted(set(known))
    named = []
    for key in [keys] if isinstance(keys, str) else keys:
        k = key.replace("-", "_")
        close = difflib.get_close_matches(k, known, n=1)
        if not close and len(k) >= 3:  # a part of a name: "idle", "concurrency"
            close = [n for n in known if k in n][:1]
        alias = _names().get(k)
        if alias is not None and alias.name in known:
            close = [alias.name]
        named.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    return f"unknown {what} {', '.join(named)}; known: {', '.join(known)}"


def settings_from_tokens(tokens: Iterable[str], extra: Iterable[Setting] = ()) -> dict[str, Any]:
    """``key=value`` tokens (of a ``%%flash`` line) as settings, by their names in SETTINGS.

    Aliases become the setting's name (``deps`` -> ``dependencies``, ``timeout`` ->
    ``execution_timeout``); ``-`` in a key reads as ``_``; ``env=K=V`` may repeat. ``extra``
    adds the caller's own keys (e.g. the magic's ``limit``), parsed the same way and
    returned under their names. Only the text is checked here (numbers, K=V, MIN,MAX);
    ``EndpointConfig.build`` checks the values. Raises ConfigError naming the key.
    """
    extra = tuple(extra)
    out: dict[str, Any] = {}
    for tok in tokens:
        key, sep, text = tok.partition("=")
        if not sep:
            raise ConfigError(f"expected key=value, not {tok!r}")
        s = _lookup(key, extra)
        value = s.parse_text(text)
        if s.kind == "env":
            out.setdefault(s.name, {}).update(value)
        else:
            out[s.name] = value
    return out


def settings_help(extra: Iterable[Setting] = (), sep: str = "; ") -> str:
    """One line per setting (joined by ``sep``): how to write it and what it means."""
    parts = []
    for s in (*SETTINGS, *extra):
        also = [n for n in (s.name, *s.aliases) if not s.token.startswith(n + "=")]
        alias = f" (also {', '.join(a + '=' for a in also)})" if also else ""
        parts.append(f"{s.token}{alias}: {s.help}")
    return sep.join(parts)


def parse_workers_text(text: str) -> tuple[int, int]:
    """``"MIN,MAX"`` or ``"N"`` (= ``0,N``) as a checked (min, max) pair: the one reading
    of a worker range typed as text (``workers=``, ``flash-jupyter scale``, ``%flash scale``)."""
    if not isinstance(text, str):
        raise ConfigError(f"workers must be text N or MIN,MAX, not {text!r}")
    return _parse_workers(text)


def default_endpoint_name(settings: Mapping[str, Any]) -> str:
    """The endpoint a ``%%flash`` cell without ``name=`` uses: ``notebook`` when its settings
    build what ``notebook`` with default settings would (hardware, dependencies, env,
    max_concurrency), else ``notebook-`` and 8 hex digits of that environment. Cells with
    different environments never share an endpoint; the same settings always give the same
    name. Scaling settings (workers, idle_timeout, execution_timeout) and keys that are not
    settings (``name``, ``limit``) do not count."""
    env_settings: dict[str, Any] = {}
    table = _names()
    for k, v in settings.items():
        s = table.get(k)
        if s is not None and s.env:
            env_settings[s.name] = v
    if not env_settings:
        return DEFAULT_NAME
    digest = EndpointConfig.build(DEFAULT_NAME, **env_settings).env_hash
    if digest == _default_env_hash():
        return DEFAULT_NAME
    return f"{DEFAULT_NAME}-{digest[:8]}"


def _default_env_hash() -> str:
    return EndpointConfig.build(DEFAULT_NAME).env_hash


@dataclass(frozen=True)
class EndpointConfig:
    name: str
    gpu: tuple[str, ...] = ()  # acceptable GPU types, canonical names, in order of preference
    cpu: str | None = None
    gpu_count: int = 1
    workers_min: int = 0
    workers_max: int = 1
    idle_timeout: float = 60
    dependencies: tuple[str, ...] = ()
    system_dependencies: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    execution_timeout: float | None = None
    max_concurrency: int = 1
    preload: tuple[str, ...] = ()

    # -- construction
    @classmethod
    def build(cls, name: str, **settings: Any) -> EndpointConfig:
        """Check settings given by their names in SETTINGS (the decorator's keywords); those
        not given take their defaults. Raises ConfigError naming the setting at fault."""
        unknown = [k for k in settings if k not in _BUILD_KEYS]
        if unknown:
            raise ConfigError(_unknown(unknown, _BUILD_KEYS))
        v = {k: settings.get(k, BY_NAME[k].default) for k in _BUILD_KEYS}
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ConfigError(
                f"endpoint name {name!r} is not valid: use 1-64 letters, digits, '_', '-', '.'"
            )
        gpu, cpu = v["gpu"], v["cpu"]
        gpus: tuple[str, ...] = ()
        if gpu is not None:
            if cpu is not None:
                raise ConfigError("give gpu= or cpu=, not both")
            names = [gpu] if isinstance(gpu, str) else gpu
            if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
                raise ConfigError(f"gpu must be a GPU type or a list of them, not {gpu!r}")
            if not names:
                raise ConfigError("gpu= needs at least one GPU type")
            try:
                gpus = tuple(dict.fromkeys(catalog.lookup(n, "gpu").name for n in names))
            except ValueError as e:
                raise ConfigError(str(e)) from None
        cpu_name = None
        if cpu is not None:
            if not isinstance(cpu, str):
                raise ConfigError(f"cpu must be a CPU type, not {cpu!r}")
            try:
                cpu_name = catalog.lookup(cpu, "cpu").name
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if not gpus and cpu_name is None:
            cpu_name = catalog.DEFAULT_CPU
        gpu_count = v["gpu_count"]
        if not _is_int(gpu_count) or not 1 <= gpu_count <= 8:
            raise ConfigError(f"gpu_count must be an integer from 1 to 8, not {gpu_count!r}")
        wmin, wmax = _parse_workers(v["workers"])
        idle_timeout = v["idle_timeout"]
        idle = _finite(idle_timeout)
        if idle is None:
            raise ConfigError(
                f"idle_timeout must be a finite number of seconds, not {idle_timeout!r}"
            )
        if not 1 <= idle <= 3600:
            raise ConfigError(f"idle_timeout must be between 1 and 3600 seconds, not {idle:g}")
        execution_timeout = v["execution_timeout"]
        exec_limit = None
        if execution_timeout is not None:
            exec_limit = _finite(execution_timeout)
            if exec_limit is None or exec_limit <= 0:
                raise ConfigError(
                    f"execution_timeout must be a positive, finite number of seconds or None, "
                    f"not {execution_timeout!r}"
                )
        max_concurrency = v["max_concurrency"]
        if not _is_int(max_concurrency) or not 1 <= max_concurrency <= 1000:
            raise ConfigError(
                f"max_concurrency must be an integer from 1 to 1000, not {max_concurrency!r}"
            )
        deps = _str_tuple(v["dependencies"], "dependencies")
        preload = _module_names(v["preload"])
        sysdeps = _str_tuple(v["system_dependencies"], "system_dependencies")
        env = v["env"]
        if env is None:
            env = {}
        if not isinstance(env, Mapping):
            raise ConfigError(f"env must map str to str, not {env!r}")
        env = dict(env)
        for k, val in env.items():
            if not isinstance(k, str) or not isinstance(val, str):
                raise ConfigError(f"env must map str to str; got {k!r}: {val!r}")
        return cls(
            name=name,
            gpu=gpus,
            cpu=cpu_name,
            gpu_count=gpu_count,
            workers_min=wmin,
            workers_max=wmax,
            idle_timeout=idle,
            dependencies=deps,
            system_dependencies=sysdeps,
            env=env,
            execution_timeout=exec_limit,
            max_concurrency=max_concurrency,
            preload=preload,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EndpointConfig:
        """Accept the normal form (``to_dict``, also the ``"config"`` of a ``/v1`` endpoint
        view) or the decorator's keyword names; settings left out take their defaults."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"endpoint settings must be an object, not {d!r}")
        d = dict(d)
        if "workers_min" in d or "workers_max" in d:
            if "workers" in d:
                raise ConfigError("give workers or workers_min and workers_max, not both")
            d["workers"] = (d.pop("workers_min", 0), d.pop("workers_max", 1))
        unknown = sorted(k for k in d if k not in BY_NAME)
        if unknown:
            known = [*BY_NAME, "workers_min", "workers_max"]
            raise ConfigError(_unknown(unknown, known, "endpoint setting(s):"))
        if "name" not in d:
            raise ConfigError("endpoint config needs a name")
        name = d.pop("name")
        if d.get("gpu") in ([], ()):
            d.pop("gpu")
        return cls.build(name, **d)

    def changed(self, **settings: Any) -> EndpointConfig:
        """This configuration with only the given settings changed (decorator names; the
        others stay as they are), checked as ``build`` checks them. Giving ``gpu`` drops
        the current ``cpu`` and the other way round; ``workers=N`` means ``(0, N)``."""
        if not settings:
            return self
        unknown = [k for k in settings if k not in BY_NAME]
        if unknown:
            raise ConfigError(_unknown(unknown, BY_NAME))
        current = self.settings()
        if settings.get("gpu") is not None:
            current["cpu"] = None
        if settings.get("cpu") is not None:
            current["gpu"] = None
        current.update(settings)
        return type(self).build(current.pop("name"), **current)

    # -- views
    def settings(self) -> dict[str, Any]:
        """The configuration by the decorator's names: ``build(**settings())`` is itself."""
        return {
            "name": self.name,
            "gpu": list(self.gpu) or None,
            "cpu": self.cpu,
            "gpu_count": self.gpu_count,
            "workers": (self.workers_min, self.workers_max),
            "idle_timeout": self.idle_timeout,
            "dependencies": self.dependencies,
            "system_dependencies": self.system_dependencies,
            "env": dict(self.env),
            "execution_timeout": self.execution_timeout,
            "max_concurrency": self.max_concurrency,
            "preload": self.preload,
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gpu"] = list(self.gpu)
        d["dependencies"] = list(self.dependencies)
        d["system_dependencies"] = list(self.system_dependencies)
        d["preload"] = list(self.preload)
        return d

    def _hash(self, fields: tuple[str, ...] | None) -> str:
        d = self.to_dict()
        if fields is not None:
            d = {k: d[k] for k in fields}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def config_hash(self) -> str:
        return self._hash(None)

    @property
    def env_hash(self) -> str:
        return self._hash(ENV_FIELDS)

    @property
    def hardware(self) -> catalog.HardwareType:
        return catalog.lookup(self.gpu[0], "gpu") if self.gpu else catalog.lookup(self.cpu, "cpu")

    @property
    def price_per_second(self) -> float:
        hw = self.hardware
        return hw.price_per_second * (self.gpu_count if hw.kind == "gpu" else 1)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v: Any) -> float | None:
    """``v`` as a float if it is a real, finite number (not a bool, NaN, an infinity, or an
    integer too large for a float); None otherwise. Every float setting goes through here, so
    no path (decorator, HTTP PUT, wire deploy, scale) can store a value JSON cannot carry."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _parse_workers(workers: Any) -> tuple[int, int]:
    if workers is None:
        return 0, 1
    if isinstance(workers, str):
        text = workers
        parts = [p for p in re.split(r"[,:\s]+", workers.strip()) if p]
        try:
            workers = tuple(int(p) for p in parts)
        except ValueError:
            raise WorkersTextError(f"workers must be N or MIN,MAX, not {workers!r}") from None
        if len(workers) == 1:
            workers = workers[0]
        elif len(workers) != 2:
            raise WorkersTextError(f"workers must be N or MIN,MAX, not {text!r}")
    if _is_int(workers):
        wmin, wmax = 0, workers
    elif isinstance(workers, (tuple, list)) and len(workers) == 2:
        wmin, wmax = workers
    else:
        raise ConfigError(f"workers must be an int n or a (min, max) pair, not {workers!r}")
    if not (_is_int(wmin) and _is_int(wmax)):
        raise ConfigError(f"workers min and max must be integers, not {workers!r}")
    if wmin < 0 or wmax < 1:
        raise ConfigError(f"workers needs 0 <= min and max >= 1, not {workers!r}")
    if wmin > wmax:
        raise ConfigError(f"workers min ({wmin}) must not exceed max ({wmax})")
    if wmax > 100:
        raise ConfigError(f"workers max must be at most 100, not {wmax}")
    return wmin, wmax


def _module_names(v: Any) -> tuple[str, ...]:
    """``preload``: importable module names (``torch``, ``numpy.linalg``), each once."""
    names = _str_tuple(v, "preload")
    bad = [n for n in names if not MODULE_RE.match(n)]
    if bad:
        raise ConfigError(
            f"preload names modules to import, like torch or numpy.linalg; not "
            f"{', '.join(map(repr, bad))}"
        )
    return tuple(dict.fromkeys(names))


def _str_tuple(v: Any, what: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        v = [p for p in re.split(r"[,\s]+", v) if p]
    elif isinstance(v, (bytes, Mapping)) or not isinstance(v, Iterable):
        raise ConfigError(f"{what} must be a list of strings, not {v!r}")
    v = tuple(v)
    if not all(isinstance(x, str) for x in v):
        raise ConfigError(f"{what} must be a list of strings, not {list(v)!r}")
    return v
