"""A ``%%flash`` cell's first line, read as the magic reads it, without IPython.

Used where IPython may be missing: the Jupyter server's prewarm (``labserver``) and
``flash-jupyter build``/``deploy`` reading a notebook (``app/discover.py``). The line is
split as IPython's ``arg_split`` splits it (``shlex``, non-POSIX, no comments) and parsed by
an ``argparse`` parser with the magic's options (``jupyter/magics.py``:
``FlashMagics.flash_cell``; a test keeps the two equal). The settings then follow the magic's
own rules, from ``config``: ``settings_from_tokens`` with the magic's ``limit``,
``default_endpoint_name`` when no ``name=`` is given, ``EndpointConfig.build`` to check them.
The kernel's ``%flash config`` defaults are not in the line: only ``discover``, which reads
the whole notebook, applies them.
"""

from __future__ import annotations

import argparse
import re
import shlex
from typing import Any

from .config import EndpointConfig, Setting, default_endpoint_name, settings_from_tokens
from .errors import ConfigError

# The magic's own `limit=` (jupyter/magics.py LIMIT): read, then left out of the settings.
LIMIT = Setting("limit", None, "int", "bytes: values bigger than this stay on the worker",
                "limit=BYTES")  # fmt: skip

_MAGIC = re.compile(r"%%flash(?=\s|$)")


class LineError(ValueError):
    """The line is not a ``%%flash`` line the magic would accept; the message says why."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would print and exit
        raise LineError(f"%%flash: {message}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="%%flash", add_help=False)
    p.add_argument("settings", nargs="*")
    p.add_argument("--noblock", action="store_true")
    p.add_argument("-o", "--output", default="_flash_job")
    p.add_argument("--out", default=None)
    p.add_argument("--keep", default=None)
    p.add_argument("--local", action="store_true")
    return p


PARSER = _parser()


def split(text: str) -> list[str]:
    """IPython's ``arg_split`` (non-POSIX shlex: quotes stay, no comments)."""
    lex = shlex.shlex(text, posix=False)
    lex.whitespace_split = True
    lex.commenters = ""
    try:
        return list(lex)
    except ValueError as e:
        raise LineError(f"%%flash: {e}") from None


def endpoint_for(line: str) -> tuple[str, dict[str, Any]]:
    """The endpoint a cell starting with ``line`` runs on, and the changes it asks for
    (what ``%%flash`` deploys with), checked as the magic checks them. Only the first line
    counts. LineError for a line that is not ``%%flash`` or that the magic would refuse."""
    if not isinstance(line, str):
        raise LineError('"line" must be the text of a %%flash line')
    first = line.lstrip().split("\n", 1)[0].rstrip("\r")
    m = _MAGIC.match(first)
    if m is None:
        raise LineError(f"not a %%flash line: {first[:80]!r} (a %%flash cell starts with %%flash)")
    args = PARSER.parse_args(split(first[m.end() :]))
    try:
        changes = settings_from_tokens(args.settings, extra=(LIMIT,))
        changes.pop("limit", None)
        name = changes.pop("name", None) or default_endpoint_name(changes)
        EndpointConfig.build(name, **changes)
    except ConfigError as e:
        raise LineError(f"%%flash: {e}") from None
    return name, changes
