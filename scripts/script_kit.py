"""What the scripts in this folder share: a free port, waiting on a condition with a deadline,
and the Markdown table each prints as its summary.

The scripts import it as a sibling (``sys.path`` gets this folder first), so each runs as
``python scripts/NAME.py`` and imports by file path from the tests.
"""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """``pred()``'s first true value, asked every ``interval`` s; TimeoutError naming ``what``
    after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def format_table(rows: list[list[str]], head: list[str]) -> str:
    """A Markdown table with aligned columns (pasteable into a note as it is)."""
    cells = [[str(c).replace("|", "/").replace("\n", " ") for c in r] for r in [head, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def run_checks(run: Callable[[], tuple[list[list[str]], bool]], work: Path, keep: bool) -> int:
    """Run a script's checks, print their table, remove its folder if all passed (and not
    ``keep``) or say where it is; the exit status (0: every check passed, 1: one failed)."""
    try:
        rows, ok = run()
    except Exception as e:
        rows, ok = [["run", "FAIL", f"{type(e).__name__}: {e}"[:300]]], False
    print()
    print(format_table(rows, ["check", "result", "detail"]))
    if ok and not keep:
        shutil.rmtree(work, ignore_errors=True)
    elif not ok:
        print(f"data and logs kept in {work}")
    return 0 if ok else 1
