"""An endpoint's configuration: validation, normal form, and what counts as a change.

Shared by the decorator (validates at decoration time) and the control plane (validates
what arrives over HTTP). Two hashes decide what an update does:

- ``env_hash`` covers what a running worker was built with (hardware, dependencies,
  environment variables, concurrency). A change makes existing workers Outdated: they finish
  their job and are replaced.
- ``config_hash`` covers everything, including scaling (workers, idle_timeout) and
  execution_timeout, which apply at once without restarting anyone.

Function code is not configuration: it travels with each job.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from . import catalog
from .errors import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
ENV_FIELDS = (
    "gpu",
    "cpu",
    "gpu_count",
    "dependencies",
    "system_dependencies",
    "env",
    "max_concurrency",
)
SCALING_FIELDS = ("workers_min", "workers_max", "idle_timeout", "execution_timeout")


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

    # -- construction
    @classmethod
    def build(
        cls,
        name: str,
        *,
        gpu: str | list[str] | tuple[str, ...] | None = None,
        cpu: str | None = None,
        gpu_count: int = 1,
        workers: int | tuple[int, int] | list[int] | None = (0, 1),
        idle_timeout: float = 60,
        dependencies: list[str] | tuple[str, ...] = (),
        system_dependencies: list[str] | tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        execution_timeout: float | None = None,
        max_concurrency: int = 1,
    ) -> EndpointConfig:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ConfigError(
                f"endpoint name {name!r} is not valid: use 1-64 letters, digits, '_', '-', '.'"
            )
        gpus: tuple[str, ...] = ()
        if gpu is not None:
            if cpu is not None:
                raise ConfigError("give gpu= or cpu=, not both")
            names = [gpu] if isinstance(gpu, str) else list(gpu)
            if not names:
                raise ConfigError("gpu= needs at least one GPU type")
            try:
                gpus = tuple(dict.fromkeys(catalog.lookup(n, "gpu").name for n in names))
            except ValueError as e:
                raise ConfigError(str(e)) from None
        cpu_name = None
        if cpu is not None:
            try:
                cpu_name = catalog.lookup(cpu, "cpu").name
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if not gpus and cpu_name is None:
            cpu_name = catalog.DEFAULT_CPU
        if not isinstance(gpu_count, int) or isinstance(gpu_count, bool) or not 1 <= gpu_count <= 8:
            raise ConfigError(f"gpu_count must be an integer from 1 to 8, not {gpu_count!r}")
        wmin, wmax = _parse_workers(workers)
        idle = _finite(idle_timeout)
        if idle is None:
            raise ConfigError(
                f"idle_timeout must be a finite number of seconds, not {idle_timeout!r}"
            )
        if not 1 <= idle <= 3600:
            raise ConfigError(f"idle_timeout must be between 1 and 3600 seconds, not {idle:g}")
        exec_limit = None
        if execution_timeout is not None:
            exec_limit = _finite(execution_timeout)
            if exec_limit is None or exec_limit <= 0:
                raise ConfigError(
                    f"execution_timeout must be a positive, finite number of seconds or None, "
                    f"not {execution_timeout!r}"
                )
        if (
            not isinstance(max_concurrency, int)
            or isinstance(max_concurrency, bool)
            or not 1 <= max_concurrency <= 1000
        ):
            raise ConfigError(f"max_concurrency must be an integer >= 1, not {max_concurrency!r}")
        deps = _str_tuple(dependencies, "dependencies")
        sysdeps = _str_tuple(system_dependencies, "system_dependencies")
        env = dict(env or {})
        for k, v in env.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ConfigError(f"env must map str to str; got {k!r}: {v!r}")
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
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EndpointConfig:
        """Accept the normal form (to_dict) or the decorator's keyword names."""
        d = dict(d)
        if "workers_min" in d or "workers_max" in d:
            d["workers"] = (d.pop("workers_min", 0), d.pop("workers_max", 1))
        allowed = {
            "name", "gpu", "cpu", "gpu_count", "workers", "idle_timeout", "dependencies",
            "system_dependencies", "env", "execution_timeout", "max_concurrency",
        }  # fmt: skip
        unknown = set(d) - allowed
        if unknown:
            raise ConfigError(f"unknown endpoint setting(s): {', '.join(sorted(unknown))}")
        if "name" not in d:
            raise ConfigError("endpoint config needs a name")
        name = d.pop("name")
        if d.get("gpu") in ([], ()):
            d.pop("gpu")
        return cls.build(name, **d)

    # -- views
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gpu"] = list(self.gpu)
        d["dependencies"] = list(self.dependencies)
        d["system_dependencies"] = list(self.system_dependencies)
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
        parts = [p for p in re.split(r"[,:\s]+", workers.strip()) if p]
        try:
            workers = tuple(int(p) for p in parts)
        except ValueError:
            raise ConfigError(f"workers must be N or MIN,MAX, not {workers!r}") from None
        if len(workers) == 1:
            workers = workers[0]
    if isinstance(workers, int) and not isinstance(workers, bool):
        wmin, wmax = 0, workers
    elif isinstance(workers, (tuple, list)) and len(workers) == 2:
        wmin, wmax = workers
    else:
        raise ConfigError(f"workers must be an int n or a (min, max) pair, not {workers!r}")
    if not all(isinstance(w, int) and not isinstance(w, bool) for w in (wmin, wmax)):
        raise ConfigError(f"workers min and max must be integers, not {workers!r}")
    if wmin < 0 or wmax < 1:
        raise ConfigError(f"workers needs 0 <= min and max >= 1, not {workers!r}")
    if wmin > wmax:
        raise ConfigError(f"workers min ({wmin}) must not exceed max ({wmax})")
    if wmax > 100:
        raise ConfigError(f"workers max must be at most 100, not {wmax}")
    return wmin, wmax


def _str_tuple(v: Any, what: str) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [p for p in re.split(r"[,\s]+", v) if p]
    if not all(isinstance(x, str) for x in v):
        raise ConfigError(f"{what} must be a list of strings")
    return tuple(v)
