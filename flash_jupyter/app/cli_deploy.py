"""``flash-jupyter deploy``, ``undeploy`` and ``dev``: the arguments, and the calls into
``deploy.py`` and ``devserver.py``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

PATH_HELP = "a .py file, a package folder, or an .ipynb"


def add_parsers(sub: Any) -> None:
    s = sub.add_parser(
        "deploy",
        help="register every endpoint of a file with the control plane, callable over HTTP",
        description="Find every @Endpoint function and class and every %%flash cell of PATH "
        "(or a Runpod worker file: one that calls runpod.serverless.start) "
        "(without running it), build their environments, create, update or reuse each "
        "endpoint at its settings with a handler that answers /v2/NAME/run, bring up its "
        "min workers, and print its URLs and a curl line.",
    )
    s.add_argument("path", help=PATH_HELP)
    s.add_argument(
        "--no-build",
        action="store_true",
        help="do not pre-build environments (the first cold start installs them)",
    )
    _set_option(s)
    s.add_argument("--no-wait", action="store_true",
                   help="do not wait for the endpoints' min workers to be ready")  # fmt: skip
    s = sub.add_parser(
        "undeploy",
        help="delete endpoints: by NAME, every endpoint of a PATH, or --all",
        description="Delete endpoints (their queued jobs are cancelled, their workers stop). "
        "Each argument is an endpoint NAME, or a PATH whose endpoints all go.",
    )
    s.add_argument("targets", nargs="*", metavar="NAME|PATH")
    s.add_argument("--all", action="store_true", help="every endpoint of the control plane")
    s = sub.add_parser(
        "dev",
        help="a local web app (FastAPI, Swagger at /docs) in front of PATH's endpoints",
        description="Deploy PATH's endpoints, then serve POST /NAME/runsync, POST /NAME/run "
        "and GET /NAME/status/ID for each, with request models from the signatures; "
        "requests run on the control plane's workers.",
    )
    s.add_argument("path", help=PATH_HELP)
    s.add_argument("--reload", action="store_true",
                   help="watch PATH and redeploy when it changes")  # fmt: skip
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--no-build", action="store_true", help="do not pre-build environments")
    _set_option(s)


def _set_option(s: Any) -> None:
    s.add_argument("--set", action="append", default=[], metavar="NAME.SETTING=VALUE",
                   help="a setting the file does not give as a literal (repeatable), "
                   "e.g. --set train.gpu=A100")  # fmt: skip


def _overrides(a: argparse.Namespace) -> dict[str, dict[str, Any]]:
    from .discover import parse_overrides

    return parse_overrides(a.set)


def run(a: argparse.Namespace) -> int:
    from ..errors import FlashError

    try:
        return _run(a)
    except FlashError:
        raise  # cli.py prints it on one line
    except (OSError, SyntaxError, ValueError) as e:  # a bad PATH, a file that does not parse
        print(f"flash-jupyter {a.cmd}: {e}", file=sys.stderr)
        return 1


def _run(a: argparse.Namespace) -> int:
    if a.cmd == "deploy":
        from .deploy import deploy

        deploy(a.path, build=not a.no_build, wait=not a.no_wait, overrides=_overrides(a))
        return 0
    if a.cmd == "undeploy":
        if not a.targets and not a.all:
            print("flash-jupyter undeploy: name endpoints or paths, or give --all",
                  file=sys.stderr)  # fmt: skip
            return 2
        from .deploy import undeploy

        undeploy(a.targets, all=a.all)
        return 0
    if a.cmd == "dev":
        from .devserver import serve

        serve(a.path, host=a.host, port=a.port, reload=a.reload, build=not a.no_build,
              overrides=_overrides(a))  # fmt: skip
        return 0
    return 2
