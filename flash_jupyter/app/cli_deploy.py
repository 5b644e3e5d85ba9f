"""``flash-jupyter deploy``, ``undeploy`` and ``dev`` (to be written: issue 9)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parsers(sub: Any) -> None:
    pass


def run(a: argparse.Namespace) -> int:
    return 2
