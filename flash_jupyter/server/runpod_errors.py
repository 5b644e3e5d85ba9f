"""A failed HTTP job's ``error`` as Runpod's workers report it.

Runpod's worker SDK (``runpod/serverless/modules/rp_job.py``, ``run_job``) catches the
handler's exception and sends ``json.dumps`` of ``error_type`` (``str(type(err))``, e.g.
``"<class 'ValueError'>"``), ``error_message`` (``str(err)``), ``error_traceback`` (the
formatted traceback), ``hostname``, ``worker_id`` and ``runpod_version``; ``/status`` then
shows that string as the job's ``error``. Clients that ``json.loads`` it work here too.
Jobs submitted from Python keep their richer error object (the wire carries it as it is).
"""

from __future__ import annotations

import json
import socket
from typing import Any

from .. import __version__

HOSTNAME = socket.gethostname()  # the local provider's workers run on this host
SDK_VERSION = f"flash-jupyter {__version__}"  # in the place of runpod_version
GENERIC_TYPE = "flash_jupyter.errors.JobFailed"  # failures with no exception type


def runpod_error(error: dict[str, Any], worker_id: str | None) -> str:
    """``error`` (the control plane's record of a FAILED job) in Runpod's shape."""
    tb = error.get("traceback") or ""
    if tb and not tb.startswith("Traceback"):
        tb = "Traceback (most recent call last):\n" + tb
    return json.dumps(
        {
            "error_type": f"<class '{error.get('type') or GENERIC_TYPE}'>",
            "error_message": str(error.get("message") or ""),
            "error_traceback": tb,
            "hostname": HOSTNAME,
            "worker_id": worker_id or "unknown",
            "runpod_version": SDK_VERSION,
        },
        default=repr,
    )
