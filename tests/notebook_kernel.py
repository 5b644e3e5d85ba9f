"""A real ipykernel against the test control plane, shared by the notebook tests: the kernel
fixtures (one per module, or one per test), the control plane's HTTP API, and the stop of each
test's endpoints afterwards. Import what a test module uses (the autouse fixture included)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import httpx
import pytest
from conftest import Server

pytest.importorskip("ipykernel")
pytest.importorskip("jupyter_client")

from kernel import Kernel


def start_kernel(server: Server, tmp) -> Kernel:
    env = {
        **os.environ,
        "FLASH_JUPYTER_URL": server.url,
        "FLASH_JUPYTER_TOKEN": server.token,
        "IPYTHONDIR": str(tmp / "ipython"),
        "JPY_SESSION_NAME": f"test-magics-{os.getpid()}-{tmp.name}",
        # Live receipts add displays whose timings vary; the tests that check a cell's exact
        # outputs run without them (tests/test_receipts.py turns them on).
        "FLASH_JUPYTER_RECEIPTS": "0",
    }
    env.pop("MPLBACKEND", None)
    k = Kernel(env, cwd=str(tmp))
    try:
        assert k.value("import sys; sys.executable") == repr(sys.executable)
        k.ok("%load_ext flash_jupyter")
    except BaseException:
        k.shutdown()
        raise
    return k


@pytest.fixture(scope="module")
def kernel(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kernel]:
    k = start_kernel(server, tmp_path_factory.mktemp("kernel"))
    yield k
    k.shutdown()


@pytest.fixture
def fresh_kernel(server: Server, tmp_path) -> Iterator[Kernel]:
    """A kernel of its own, for tests that change session-wide settings."""
    k = start_kernel(server, tmp_path)
    yield k
    k.shutdown()


@pytest.fixture(autouse=True)
def _stop_endpoints(request: pytest.FixtureRequest, server: Server) -> Iterator[None]:
    """Stop the test's endpoints afterwards: their warm workers would otherwise hold the
    control plane's worker slots (and memory) for the rest of the session."""
    if "name" not in request.fixturenames:
        yield
        return
    name = request.getfixturevalue("name")
    yield
    with server.http() as c:
        for ep in c.get("/v1/endpoints").json():
            if ep["name"].startswith(name):
                c.post(f"/v1/endpoints/{ep['name']}/stop")


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    with server.http() as c:
        yield c


def health(http: httpx.Client, name: str) -> dict:
    r = http.get(f"/v2/{name}/health")
    r.raise_for_status()
    return r.json()


def jobs(http: httpx.Client, name: str) -> list[dict]:
    r = http.get("/v1/jobs", params={"endpoint": name})
    r.raise_for_status()
    return r.json()


def endpoint(http: httpx.Client, name: str) -> dict:
    r = http.get(f"/v1/endpoints/{name}")
    r.raise_for_status()
    return r.json()
