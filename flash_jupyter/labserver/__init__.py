"""The Jupyter server extension behind the Flash sidebar: ``/flash-jupyter/api/...``.

Enabled by installing the package (``jupyter-config/server-config/flash_jupyter.json`` goes
to ``etc/jupyter/jupyter_server_config.d``), which names the extension package
``flash_jupyter``; its ``_jupyter_server_extension_points`` points here. Importing this
module stays light: Jupyter's and tornado's modules load only when the server loads it.
"""

from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "flash_jupyter.labserver"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    """Add the routes; the control plane is found (or started) when a route asks for it."""
    from .handlers import API, setup

    setup(serverapp)
    serverapp.log.info("flash-jupyter: server extension loaded at /%s", API)
