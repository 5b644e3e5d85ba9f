"""Credentials on the wire, derived from the control plane's token.

The token grants everything: the HTTP API and the wire as a client (which can run code on
workers). A worker process runs user code, so it never sees the token. It gets a credential
that is good for one thing only: saying hello on the wire as that worker, in that
incarnation (a new process of the same slot gets a new one). The spare worker gets one that
is good only for being that spare. Both are HMACs of the token, so the control plane checks
them without keeping a list, and nothing can be learned about the token from them.
"""

from __future__ import annotations

import hashlib
import hmac


def _derive(token: str, *parts: str) -> str:
    msg = "\0".join(parts).encode()
    return hmac.new(token.encode(), msg, hashlib.sha256).hexdigest()


def worker_credential(token: str, worker_id: str, incarnation: int) -> str:
    """What worker ``worker_id`` (incarnation ``incarnation``) says hello with."""
    return _derive(token, "worker", worker_id, str(int(incarnation)))


def spare_credential(token: str, nonce: str) -> str:
    """What the spare worker started with ``nonce`` says hello with."""
    return _derive(token, "spare", nonce)


def same(expected: str, given: object) -> bool:
    """Constant-time comparison; anything but a string is wrong."""
    return isinstance(given, str) and hmac.compare_digest(expected.encode(), given.encode())
