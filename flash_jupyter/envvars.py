"""The environment variables flash-jupyter reads: one entry each, and typed accessors.

Every ``FLASH_JUPYTER_*`` variable is listed once in ``VARS`` with its kind, default and
meaning; code reads them only through ``get`` (or ``take`` for the worker's own, which are
removed from the environment once read). Reads happen at the moment of the call, so a
variable set in a subprocess's environment applies there. The table of environment
variables in docs/configuration.md is ``docs_table()`` (``python -m flash_jupyter.envvars``
prints it; a test keeps the two the same).

Imported before anything heavy (the control plane's first milliseconds, worker start-up):
the standard library's ``os`` only.
"""

from __future__ import annotations

import os
from typing import Any

TEXT, PATH, INT, FLOAT, FLAG = "text", "path", "int", "float", "flag"
_KIND_WORDS = {
    INT: "a whole number",
    FLOAT: "a number",
    FLAG: "0 or 1",
}


class EnvVarError(ValueError):
    """An environment variable holds a value of the wrong kind; the message names it."""


class Var:
    """One environment variable. (A plain class: this module loads at every worker start.)"""

    __slots__ = ("default", "default_doc", "doc_only", "kind", "meaning", "minimum", "name",
                 "read_by")  # fmt: skip

    def __init__(
        self,
        name: str,
        kind: str,  # TEXT, PATH, INT, FLOAT or FLAG
        default: Any,  # the value when unset (or set to the empty string, except for flags)
        read_by: str,  # docs: who reads it
        default_doc: str,  # docs: the default as written in the table
        meaning: str,  # docs: what it does (markdown)
        minimum: float | None = None,  # numbers: the smallest value accepted
        doc_only: bool = False,  # documented here, but flash-jupyter never reads it itself
    ):
        self.name, self.kind, self.default, self.read_by = name, kind, default, read_by
        self.default_doc, self.meaning, self.minimum = default_doc, meaning, minimum
        self.doc_only = doc_only

    def __repr__(self) -> str:
        return f"Var({self.name!r}, {self.kind!r}, default={self.default!r})"


VARS: tuple[Var, ...] = (
    Var("FLASH_JUPYTER_URL", TEXT, None, "clients, CLI", "unset",
        "HTTP URL of the control plane to use, e.g. `http://10.0.0.5:8700`. Disables discovery "
        "and auto-start. Never passed on to workers. From another machine, results holding a "
        "buffer of 1 MiB or more cannot be read yet "
        "([limitation](ARCHITECTURE.md#shared-memory-spool-shmpy))."),
    Var("FLASH_JUPYTER_TOKEN", TEXT, None, "clients (with `FLASH_JUPYTER_URL`); `serve`", "unset",
        "the bearer token. For `serve`, the default of `--token`. Without `FLASH_JUPYTER_URL`, "
        "clients take the token from the runtime file instead."),
    Var("FLASH_JUPYTER_HOME", PATH, None, "everything",
        "`$XDG_DATA_HOME/flash-jupyter`, else `~/.local/share/flash-jupyter` (macOS: "
        "`~/Library/Application Support/flash-jupyter`)",
        "the data directory"),
    Var("FLASH_JUPYTER_IDLE_SHUTDOWN", FLOAT, 3600.0,
        "the client that auto-starts the control plane, and `flash-jupyter start`", "`3600`",
        "seconds an auto-started control plane waits, with no live worker, no queued job and "
        "no connected client, before exiting. `0` means never. `serve` does not read it (use "
        "`--idle-shutdown`).", minimum=0),
    Var("FLASH_JUPYTER_MAX_WORKERS", INT, None, "control plane", "`max(8, 4 × CPU count)`",  # noqa: RUF001
        "most worker processes at once, across all endpoints. Starts beyond it are "
        "`Throttled`.", minimum=1),
    Var("FLASH_JUPYTER_STRICT_GPU", FLAG, False, "control plane", "off",
        "any value but empty or `0`: refuse to emulate a GPU the host does not have (see "
        "[GPU placement](#gpu-placement-and-emulation)). With the Ray provider: refuse a GPU "
        "type no node of the cluster has, instead of waiting `Throttled` for one to join, and "
        "fail a worker placed on a node whose driver does not name its GPUs"),
    Var("FLASH_JUPYTER_SPARE_WORKERS", FLAG, True, "control plane", "`1`",
        "`0` (or empty): do not keep a spare worker process ready for fast cold starts"),
    Var("FLASH_JUPYTER_SPARE_LIMIT", INT, 4, "control plane", "`4`",
        "most spare worker processes at once (at most one per dependency environment, each "
        "counting against `FLASH_JUPYTER_MAX_WORKERS`; see "
        "[spares and preload](#spare-workers-and-preload))", minimum=1),
    Var("FLASH_JUPYTER_WORKER_LOG_BYTES", INT, 8 << 20, "control plane (local provider)",
        "`8388608` (8 MiB)",
        "the most bytes a worker's log keeps (`logs/<worker>.log` and its rotated "
        "`<worker>.log.1`, newest output kept; see [the data directory](#the-data-directory)). "
        "`0`: no cap", minimum=0),
    Var("FLASH_JUPYTER_RESULT_TTL", FLOAT, 1800.0, "control plane", "`1800`",
        "seconds a finished job stays queryable (its status and result, in memory and in "
        "`flash.db`) before it is pruned; Runpod keeps `/run` results 30 minutes. Pruning "
        "runs every minute, or every `RESULT_TTL` seconds when that is shorter", minimum=1),
    Var("FLASH_JUPYTER_PROVIDER", TEXT, "local", "`serve`, and control planes clients start",
        "`local`", "where workers run: `local` (processes on this machine) or `ray` (actors on "
        "a Ray cluster's nodes; see [the Ray provider](#the-ray-provider)). `serve --provider` "
        "overrides it."),
    Var("RAY_ADDRESS", TEXT, None, "`serve` with the Ray provider (and Ray itself)", "`auto`",
        "the Ray cluster to place workers on: `auto` (the cluster this machine belongs to), "
        "`HOST:6379`, or `ray://HOST:10001` (Ray Client). `serve --ray-address` overrides it."),
    Var("FLASH_JUPYTER_ADVERTISE_HOST", TEXT, None, "`serve` with the Ray provider",
        "`--host`, or this node's IP (`ray.util.get_node_ip_address()`) when `--host` is "
        "`0.0.0.0`", "the address workers on other machines connect back to (the wire port "
        "and the HTTP port listen on `--host`). `serve --advertise-host` overrides it."),
    Var("FLASH_JUPYTER_RAY_POLL", FLOAT, 0.5, "`serve` with the Ray provider", "`0.5`",
        "seconds between two reads of the Ray cluster's free resources per node (placement "
        "decides from the last read; a node that joins is used within this time)",
        minimum=0.05),
    Var("FLASH_JUPYTER_MAX_RETRIES", INT, 2, "control plane", "`2`",
        "times a job is re-run after its worker dies under it, before it fails", minimum=0),
    Var("FLASH_JUPYTER_MAX_BODY_BYTES", INT, None, "control plane",
        "unset: 10 MiB for `/run`, 20 MiB for `/runsync` (Runpod's limits)",
        "the most bytes an HTTP `/run` or `/runsync` request body may hold, one limit for "
        "both; a larger one gets 413 ([limits](rest-api.md#limits)). An input above 64 MiB "
        "cannot reach a worker: such a job fails (`JobTooLarge`). A value that is not a "
        "positive whole number is ignored, with a warning on stderr.", minimum=1),
    Var("FLASH_JUPYTER_WEBHOOK_HOSTS", TEXT, None, "control plane (at start)",
        "unset: any host, as on Runpod",
        "comma-separated host names and IP addresses that a job's `webhook` URL may name "
        "(`127.0.0.1,hooks.example.com`); a request naming another host gets 400 before "
        "anything is recorded ([webhooks](rest-api.md#webhook-the-final-status-posted-to-a-url)). "
        "Entries that are neither are ignored, with a warning on stderr."),
    Var("FLASH_JUPYTER_WEBHOOK_RETRY_DELAY", FLOAT, 10.0, "control plane (at start)", "`10`",
        "seconds between the attempts to deliver a webhook (3 attempts, as Runpod makes). A "
        "value that is not a number, 0 or more, is ignored, with a warning on stderr.",
        minimum=0),
    Var("FLASH_JUPYTER_WORKER", TEXT, None, "worker processes", "set by the control plane",
        "internal: how a worker (or the spare) finds the control plane (JSON). Removed from "
        "`os.environ` at start, like `FLASH_JUPYTER_WORKER_TOKEN`."),
    Var("FLASH_JUPYTER_WORKER_TOKEN", TEXT, None, "worker processes", "set by the control plane",
        "internal: the worker's own wire credential (not the token: see [the security "
        "model](#security-model)). Removed from `os.environ` at start, so user code does not "
        "pass it on to its subprocesses; the process's original environment block "
        "(`/proc/self/environ`) still shows it, which is why the credential grants nothing "
        "beyond that worker."),
    Var("FLASH_JUPYTER_HELLO_TIMEOUT", FLOAT, 5.0, "control plane (at start)", "`5`",
        "seconds a new wire connection has to say hello with a valid credential before it "
        "is closed", minimum=0.001),
    Var("FLASH_JUPYTER_MAX_FRAME_BYTES", INT, 4 << 30, "control plane (at start)",
        "`4294967296` (4 GiB)",
        "the most one wire frame may carry after the hello (metadata and buffers). A larger "
        "frame closes the connection with an `error` frame naming the limit; a Python call "
        "whose arguments would need a larger frame fails before sending with "
        "`SerializationError`. Arguments of 1 MiB or more on the control plane's host travel "
        "through the spool and do not count.", minimum=1),
    Var("FLASH_JUPYTER_RECEIPTS", FLAG, True, "notebook kernels", "`1`",
        "`0` (or empty): no live receipts or progress bars for `%%flash` cells, blocking calls "
        "and `.map` in a notebook (`%flash config receipts=off` does it for one kernel)"),
    Var("JPY_SESSION_NAME", TEXT, None, "`%%flash`", "set by Jupyter",
        "names the notebook's namespace on the worker; without it, `kernel-PID`"),
    Var("MPLBACKEND", TEXT, None, "workers running `%%flash` cells", "`Agg`",
        "set to `Agg` unless already set, so figures render to PNG on the worker",
        doc_only=True),
    Var("XDG_DATA_HOME", PATH, None, "everything", "`~/.local/share`",
        "base of the default data directory"),
    Var("FLASH_JUPYTER_INSTALLER", TEXT, "auto", "control plane, `flash-jupyter build`",
        "`auto`", "what builds dependency environments: `uv`, `pip`, or `auto` (uv when it is "
        "installed, else venv and pip; when uv cannot resolve the requirements, pip tries and "
        "the build says so)"),
    Var("PIP_*", TEXT, None, "pip and uv, when building dependency environments", "",
        "(`PIP_INDEX_URL`, `PIP_NO_INDEX`, `PIP_FIND_LINKS`, ...) pip runs with the control "
        "plane's environment, so its usual settings apply; uv is given the same indexes, "
        "find-links and constraints (from `pip config list`)", doc_only=True),
)  # fmt: skip

BY_NAME: dict[str, Var] = {v.name: v for v in VARS}


def _var(name: str) -> Var:
    var = BY_NAME.get(name)
    if var is None or var.doc_only:
        raise KeyError(f"{name} is not an environment variable flash-jupyter reads")
    return var


def parse(var: Var | str, raw: str | None) -> Any:
    """``raw`` (the variable's text, None when unset) as the variable's kind. Unset, or
    empty for anything but a flag, gives the default. Raises EnvVarError naming it."""
    var = _var(var) if isinstance(var, str) else var
    if raw is None:
        return var.default
    if var.kind == FLAG:
        return raw.strip() not in ("", "0")
    text = raw.strip()
    if not text:
        return var.default
    if var.kind in (TEXT, PATH):
        return raw
    try:
        value: float = int(text) if var.kind == INT else float(text)
        ok = value == value and value not in (float("inf"), float("-inf"))  # finite
    except ValueError:
        ok = False
    if ok and var.minimum is not None and value < var.minimum:
        ok = False
    if not ok:
        want = _KIND_WORDS[var.kind]
        if var.minimum is not None:
            want += f", {var.minimum:g} or more"
        raise EnvVarError(f"{var.name}={raw!r} is not valid: it must be {want}")
    return value


def get(name: str) -> Any:
    """The variable's current value, typed (see ``parse``)."""
    return parse(_var(name), os.environ.get(name))


def is_set(name: str) -> bool:
    """Whether the variable is set to something other than the empty string."""
    _var(name)
    return bool(os.environ.get(name))


def take(name: str) -> str | None:
    """The variable's text, removed from ``os.environ`` (the worker's own variables)."""
    _var(name)
    return os.environ.pop(name, None)


def worker_env(base: dict[str, str], worker: str, credential: str) -> dict[str, str]:
    """``base`` made into a worker's environment: the client's URL and token removed (user
    code on a worker has no use for them), the worker's own two variables set."""
    env = dict(base)
    env.pop("FLASH_JUPYTER_URL", None)
    env.pop("FLASH_JUPYTER_TOKEN", None)
    env["FLASH_JUPYTER_WORKER"] = worker
    env["FLASH_JUPYTER_WORKER_TOKEN"] = credential
    return env


def docs_table() -> str:
    """The markdown table of docs/configuration.md's "Environment variables"."""
    rows = ["| variable | read by | default | meaning |", "|---|---|---|---|"]
    for v in VARS:
        rows.append(f"| `{v.name}` | {v.read_by} | {v.default_doc} | {v.meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(docs_table())
