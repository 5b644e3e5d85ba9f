"""``flash-jupyter build`` and ``flash-jupyter envs`` (to be written: issue 9)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .. import paths


def add_parsers(sub: Any) -> None:
    s = sub.add_parser("build", help="build a dependency environment ahead of time")
    s.add_argument("--deps", required=True, help="comma-separated pip requirements")


def run(a: argparse.Namespace) -> int:
    if a.cmd == "build":
        from ..config import BY_NAME
        from ..providers.environments import ensure_environment

        deps = tuple(BY_NAME["dependencies"].parse_text(a.deps))
        t = time.monotonic()
        try:
            py = ensure_environment(paths.home(), deps)
        except Exception as e:  # pip's own message is the useful part
            print(f"flash-jupyter: {e}", file=sys.stderr)
            return 1
        print(f"environment ready in {time.monotonic() - t:.1f} s: {py}")
        return 0
    return 2
