"""Runpod's per-request ``policy``: ``executionTimeout``, ``ttl`` and ``lowPriority``.

Checked at the door (``check``), before anything is recorded, with Runpod's ranges
(docs.runpod.io, "Send API requests", "Execution policies"): ``executionTimeout`` from 5 s to
7 days and ``ttl`` from 10 s to 7 days, both whole milliseconds; ``lowPriority`` a boolean.
The normal form is kept in the job's stored body, so a restart of the control plane reads it
back (``apply``). What each one does:

- ``executionTimeout`` replaces the endpoint's ``execution_timeout`` for this job: past it the
  job ends ``TIMED_OUT`` and its worker is replaced (the scheduler's deadline path);
- ``ttl`` is the job's whole life from submission: still queued then, it ends ``TIMED_OUT``
  and is forgotten; finished, its record goes then (or 30 minutes after it ended, if sooner);
- ``lowPriority`` queues the job behind every job without it, and (Runpod's rule) does not
  count toward scaling up: it runs on workers already up (``scheduler._scaling_queue``).
"""

from __future__ import annotations

import difflib
from typing import Any

from . import model as m

WEEK_MS = 7 * 24 * 3600 * 1000
RANGES = {  # milliseconds, inclusive
    "executionTimeout": (5_000, WEEK_MS),
    "ttl": (10_000, WEEK_MS),
}
KEYS = ("executionTimeout", "ttl", "lowPriority")
EXAMPLE = '{"executionTimeout": 600000, "ttl": 86400000, "lowPriority": false}'


class PolicyError(ValueError):
    """A request's ``policy`` is not valid (HTTP 400, before anything is recorded)."""


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _ms(key: str, v: Any) -> int:
    lo, hi = RANGES[key]
    n: Any = None
    if type(v) is int:
        n = v
    elif type(v) is float and v.is_integer():  # 600000.0; NaN and Infinity never get here
        n = int(v)
    if n is None or not lo <= n <= hi:
        raise PolicyError(
            f"policy.{key} must be a whole number of milliseconds from {lo} ({lo // 1000} s) "
            f"to {hi} (7 days), not {_show(v)}"
        )
    return n


def check(policy: Any) -> dict[str, Any] | None:
    """The ``policy`` of a request in normal form (None when it asks for nothing)."""
    if policy is None:
        return None
    if not isinstance(policy, dict):
        raise PolicyError(f'"policy" must be a JSON object such as {EXAMPLE}, not {_show(policy)}')
    unknown = next((k for k in policy if k not in KEYS), None)
    if unknown is not None:
        k = str(unknown)
        near = difflib.get_close_matches(k, KEYS, n=1, cutoff=0.6) or [
            x for x in KEYS if x.lower() == k.lower()
        ]
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise PolicyError(
            f"unknown policy field {_show(k)}{hint}; a policy may hold {', '.join(KEYS)}"
        )
    out: dict[str, Any] = {}
    for key in RANGES:
        if policy.get(key) is not None:
            out[key] = _ms(key, policy[key])
    low = policy.get("lowPriority")
    if low is not None:
        if type(low) is not bool:
            raise PolicyError(f"policy.lowPriority must be true or false, not {_show(low)}")
        if low:
            out["lowPriority"] = True
    return out or None


def apply(job: m.Job, policy: dict[str, Any]) -> None:
    """Set ``job``'s fields from a policy in normal form."""
    timeout = policy.get("executionTimeout")
    if timeout:
        job.timeout = timeout / 1000
    ttl = policy.get("ttl")
    if ttl:
        job.expires = job.created + ttl / 1000
    job.low = bool(policy.get("lowPriority"))


def describe_ms(ms: float) -> str:
    """``ms`` as a person reads it: "5000 ms (5 s)"."""
    return f"{ms:.0f} ms ({ms / 1000:g} s)"
