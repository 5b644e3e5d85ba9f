"""The ``flash-jupyter`` subcommands of the notebook-to-app workflow: ``build``, ``envs``
(``cli_build.py``), ``deploy``, ``undeploy``, ``dev`` (``cli_deploy.py``). ``cli.py`` adds
their parsers and hands them the parsed arguments."""

from __future__ import annotations

import argparse
from typing import Any

from . import cli_build, cli_deploy

COMMANDS = ("build", "envs", "deploy", "undeploy", "dev")


def add_parsers(sub: Any) -> None:
    """Add this workflow's subcommands to ``flash-jupyter``'s subparsers."""
    cli_build.add_parsers(sub)
    cli_deploy.add_parsers(sub)


def run(a: argparse.Namespace) -> int:
    """Run one of ``COMMANDS``; the exit status."""
    if a.cmd in ("build", "envs"):
        return cli_build.run(a)
    return cli_deploy.run(a)
