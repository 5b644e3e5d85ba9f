"""Why a worker process ended, in the words its slot and its failed jobs show.

Standard library only: the Ray provider's actor (``ray_actor.py``) uses it on the nodes too.
"""

from __future__ import annotations

import os
import signal


def last_line(path: str | os.PathLike[str]) -> str:
    """The last line of a log (its last 4 KiB read), cut to 300 characters; "" if none."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            lines = f.read().decode("utf-8", "replace").strip().splitlines()
        return lines[-1][:300] if lines else ""
    except OSError:
        return ""


def exit_reason(rc: int | None, log_path: str | os.PathLike[str]) -> str:
    """``exited with code 1 (the log's last line)`` or ``killed by SIGKILL``."""
    if rc is None or rc >= 0:
        reason = f"exited with code {rc}"
        last = last_line(log_path) if rc else ""
        return f"{reason} ({last})" if last else reason
    try:
        return f"killed by {signal.Signals(-rc).name}"
    except ValueError:
        return f"killed by signal {-rc}"
